-- The outbox table (docs/design.md §2). Services insert one row per event in the same transaction
-- as their business change; the relay publishes it to Kafka and then deletes it
-- (polling mode) or reads it from the write-ahead log (logical mode).
CREATE TABLE IF NOT EXISTS public.outbox (
  id             uuid        PRIMARY KEY DEFAULT gen_random_uuid(), -- event id: header + dedupe key
  -- Polling order. Keep the sequence at CACHE 1 (the default): the polling visibility
  -- rule needs values handed out in order across sessions.
  seq            bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
  aggregate_type text        NOT NULL,                              -- picks the topic
  aggregate_id   text        NOT NULL,                              -- Kafka key
  event_type     text        NOT NULL,                              -- header
  payload        jsonb       NOT NULL,                              -- message value
  headers        jsonb       NOT NULL DEFAULT '{}',                 -- extra Kafka headers
  created_at     timestamptz NOT NULL DEFAULT now()
);
