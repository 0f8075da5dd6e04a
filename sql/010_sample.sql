-- A sample business table, and how a service writes a change and its event atomically.
CREATE TABLE IF NOT EXISTS public.orders (
  id          text        PRIMARY KEY,
  customer    text        NOT NULL,
  total_cents bigint      NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now()
);

-- The pattern: one local transaction, no distributed commit. Either both rows exist or
-- neither does; the relay does the rest.
BEGIN;
INSERT INTO public.orders (id, customer, total_cents) VALUES ('order-1', 'ada', 4200)
  ON CONFLICT (id) DO NOTHING;
INSERT INTO public.outbox (aggregate_type, aggregate_id, event_type, payload, headers)
VALUES ('order', 'order-1', 'OrderPlaced',
        '{"order_id": "order-1", "customer": "ada", "total_cents": 4200}',
        '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}');
COMMIT;
