-- Dead letters and parked aggregates (state version 2), next to the slot memory.
--
-- Every event the relay dead-letters is kept here, body byte for byte, before the source
-- acknowledges it; with sink.kafka.on_poison = "park" (the default) so is every later
-- event of the same aggregate, held in order until an operator redrives or discards it.
-- An aggregate is parked while it has a row with held = true.
CREATE TABLE IF NOT EXISTS public.outbox_relay_dlq (
  id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  kept_at          timestamptz NOT NULL DEFAULT now(),
  source_position  text        NOT NULL,   -- seq:N or lsn:X/Y
  event_id         text,
  aggregate_type   text,
  aggregate_id     text,
  event_type       text,
  headers          text,                   -- the headers column's JSON text, as stored
  topic            text,                   -- the row's topic column, as stored
  payload          bytea,                  -- the payload (or a logical message's envelope)
  payload_is_json  boolean     NOT NULL,
  created_ms       bigint,                 -- the event's timestamp (ms since the epoch)
  -- Why it was dead-lettered; NULL for an event held behind its aggregate's dead letter.
  error            text,
  reason           text,                   -- schema | too_large | invalid | refused
  -- Part of its aggregate's parked queue (false: a dead letter only, on_poison = "skip"
  -- or an event without an aggregate id).
  held             boolean     NOT NULL,
  redrives         integer     NOT NULL DEFAULT 0
);
-- The same event kept twice (its batch read again after a crash) is one row.
CREATE UNIQUE INDEX IF NOT EXISTS outbox_relay_dlq_event
  ON public.outbox_relay_dlq (source_position, (COALESCE(event_id, md5(COALESCE(payload, ''::bytea)))));
CREATE INDEX IF NOT EXISTS outbox_relay_dlq_aggregate
  ON public.outbox_relay_dlq (aggregate_type, aggregate_id, id) WHERE held;
-- Operator requests (`outbox-relay dead-letters redrive|discard`, `pause`, `resume`):
-- recorded by the command, carried out by the leading relay, kept as the audit trail.
CREATE TABLE IF NOT EXISTS public.outbox_relay_requests (
  id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  action           text        NOT NULL,   -- redrive | discard | pause | resume
  aggregate_type   text,
  aggregate_id     text,
  up_to_id         bigint,                 -- --id N: the queue up to and including N
  all_parked       boolean     NOT NULL DEFAULT false,
  requested_at     timestamptz NOT NULL DEFAULT now(),
  requested_by     text        NOT NULL DEFAULT current_user,
  application_name text        NOT NULL DEFAULT current_setting('application_name'),
  done_at          timestamptz,
  outcome          text,
  events           integer
);
-- Whether publishing is paused (`outbox-relay pause`): one row, survives restarts and
-- failover.
CREATE TABLE IF NOT EXISTS public.outbox_relay_control (
  singleton        boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
  paused           boolean     NOT NULL DEFAULT false,
  changed_at       timestamptz NOT NULL DEFAULT now(),
  changed_by       text
);
INSERT INTO public.outbox_relay_control (paused) VALUES (false) ON CONFLICT DO NOTHING;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.outbox_relay_dlq,
  public.outbox_relay_requests, public.outbox_relay_control TO outbox_relay;
UPDATE public.outbox_relay_schema SET version = 2, migrated_at = now() WHERE version < 2;
