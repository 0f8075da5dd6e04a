#!/usr/bin/env bash
# docker compose's sample writer: every second, an order and its outbox event in one
# transaction — the pattern the outbox exists for.
set -euo pipefail
n=1000
while true; do
  n=$((n + 1))
  psql -h postgres -U app -d app -v ON_ERROR_STOP=1 -q <<SQL
BEGIN;
INSERT INTO orders (id, customer, total_cents) VALUES ('order-$n', 'compose', $((n * 7 % 10000)));
INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
VALUES ('order', 'order-$n', 'OrderPlaced',
        jsonb_build_object('order_id', 'order-$n', 'total_cents', $((n * 7 % 10000))));
COMMIT;
SQL
  sleep 1
done
