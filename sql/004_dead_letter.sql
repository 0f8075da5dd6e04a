-- Where the relay keeps an event too large even for the dead-letter topic (which then
-- gets a metadata-only record: key, headers, error, position and size). Nothing is
-- dropped: the body is here, with what identifies it. Name configurable:
-- source.dead_letter_table ("" turns the fallback off: such an event then stops the
-- relay until an operator raises the topic's max.message.bytes).
CREATE TABLE IF NOT EXISTS public.outbox_relay_dead_letter (
  id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  dead_lettered_at timestamptz NOT NULL DEFAULT now(),
  source_position  text        NOT NULL,   -- seq:N or lsn:X/Y, as in the record's header
  event_id         text,
  aggregate_type   text,
  aggregate_id     text,
  event_type       text,
  headers          text,
  error            text        NOT NULL,
  body             bytea                   -- the payload (or a logical message's envelope)
);
GRANT INSERT ON public.outbox_relay_dead_letter TO outbox_relay;
