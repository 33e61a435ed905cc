# Sourced by scripts/scale-out and scripts/pgbouncer-check.
#
# start_replicas N BIN LOGDIR: starts N `BIN serve` processes on ephemeral
# loopback ports, with the caller's environment (DATABASE_URL, ...). Each
# one's pid is appended to the caller's `pids` array and, once it prints the
# address it bound ("billing: gRPC + grpc-web on ADDR, ..."), its gRPC URL to
# the caller's `targets` array. A replica not up within 30 s has its log
# shown and the function fails.
start_replicas() {
  local n=$1 bin=$2 dir=$3 i addr
  for i in $(seq 1 "$n"); do
    "$bin" serve --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$dir/serve-$i.log" 2>&1 &
    pids+=($!)
    addr=
    for _ in $(seq 1 150); do
      addr=$(sed -n 's/^billing: gRPC + grpc-web on \([^,]*\),.*/\1/p' "$dir/serve-$i.log")
      [ -n "$addr" ] && break
      sleep 0.2
    done
    [ -n "$addr" ] || { cat "$dir/serve-$i.log" >&2; return 1; }
    targets+=("http://$addr")
  done
}
