#!/bin/bash
# CPU per `send` reading on a backoffice node and on PostgreSQL
# (docs/scaling.md). Runs the send benchmark (release build) with 5 and with
# 45 batches per meter on an empty database each, and prints, for each run,
# readings/s, the benchmark process's user and system CPU and wall time, and
# PostgreSQL's CPU (the postmaster's own and its exited children's, read
# from /proc once every backend of the run has exited). The difference of
# the two runs is what 800,000 readings cost, without the setup.
#
#   backoffice/benches/cpu-per-reading.sh PGDATA HOST PORT [ROUNDS]
#
# PGDATA is the data folder of the (local) cluster, whose postmaster.pid
# names the postmaster; the database user is postgres, without a password.
set -euo pipefail
pgdata=$1 host=$2 port=$3 rounds=${4:-3}
cargo bench -p backoffice --bench send --no-run
bench=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/send-* | grep -v '\.d$' | head -1)
postmaster=$(head -1 "$pgdata/postmaster.pid")
tick=$(getconf CLK_TCK)
pg_cpu() { awk -v t="$tick" '{print ($14+$15+$16+$17)/t}' "/proc/$postmaster/stat"; }
for round in $(seq "$rounds"); do
    for batches in 5 45; do
        db="cpu_${round}_${batches}_$$"
        psql -q -h "$host" -p "$port" -U postgres -c "CREATE DATABASE $db" >/dev/null
        before=$(pg_cpu)
        out=$({ /usr/bin/time -f "node-cpu user %U system %S wall %e" env \
            BENCH_STORE="postgres://postgres@$host:$port/$db" \
            SEND_BENCH_BATCHES="$batches" "$bench" --bench; } 2>&1)
        sleep 1.5
        after=$(pg_cpu)
        echo "round $round, $batches batches per meter: $(echo "$out" | grep -o '[0-9]* readings/s')"
        echo "  $(echo "$out" | grep node-cpu)"
        echo "  database-cpu $(echo "$after - $before" | bc)"
    done
done
