# Shared by scripts/kafka.sh and scripts/s3.sh: a local server started in the
# background on 127.0.0.1, one directory per port under $RUN_DIR holding its pid and
# log. The sourcing script defines RUN_DIR and log().

# Whether a process runs (a killed server may linger as a zombie nobody reaps).
alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ensure_started PORT START_FUNCTION: runs START_FUNCTION PORT unless a server already
# answers on PORT. Several test processes may ask at once: one starts it, the others wait.
ensure_started() {
  local port="$1" start_function="$2"
  mkdir -p "$RUN_DIR"
  exec 9>"$RUN_DIR/ensure-$port.lock"
  flock 9
  if port_open "$port"; then return 0; fi
  "$start_function" "$port"
}

# stop_started PORT WHAT: stops the server this script started on PORT (TERM, then
# KILL after 30 s) and removes its directory.
stop_started() {
  local port="$1" what="$2" dir="$RUN_DIR/$1"
  [ -f "$dir/pid" ] || { log "no $what started by this script on port $port"; return 0; }
  local pid; pid="$(cat "$dir/pid")"
  if alive "$pid"; then
    kill "$pid"
    for _ in $(seq 1 60); do alive "$pid" || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -rf "$dir"
  log "$what on port $port stopped"
}

# start_background PORT WHAT COMMAND...: starts COMMAND in the background (its log in
# $RUN_DIR/PORT/server.log, its pid beside it) and waits until it listens on PORT.
start_background() {
  local port="$1" what="$2" dir="$RUN_DIR/$1"; shift 2
  if [ -f "$dir/pid" ] && alive "$(cat "$dir/pid")"; then
    log "a $what started by this script already runs on port $port"; return 0
  fi
  if port_open "$port"; then log "port $port is taken by another process"; exit 1; fi
  rm -rf "$dir"; mkdir -p "$dir"
  nohup "$@" >"$dir/server.log" 2>&1 9>&- &
  echo $! > "$dir/pid"
  for _ in $(seq 1 100); do
    if port_open "$port"; then log "$what ready on 127.0.0.1:$port (pid $(cat "$dir/pid"), logs $dir/server.log)"; return 0; fi
    alive "$(cat "$dir/pid")" || break
    sleep 0.2
  done
  log "the $what did not start; its log:"; tail -20 "$dir/server.log" >&2; exit 1
}
