-- Log mode only: the publication the relay's replication slot reads. Inserts only, so
-- the relay's own cleanup DELETEs need no REPLICA IDENTITY and are not streamed back.
-- (Logical messages from pg_logical_emit_message need no publication entry: the relay
-- asks for them with the `messages 'true'` replication option.)
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'outbox_relay') THEN
    CREATE PUBLICATION outbox_relay FOR TABLE public.outbox WITH (publish = 'insert');
  END IF;
END
$$;
