-- Log mode only: the publication the relay's replication slot reads. Inserts are the
-- events; updates and deletes are there so that a change of a written row (rows are
-- immutable) is seen and never passes silently (source.on_row_change). They need the
-- table's REPLICA IDENTITY (its primary key here): on a table without one, publish
-- 'insert' only, or PostgreSQL refuses its UPDATEs and DELETEs.
-- Via the partition root, so a partitioned outbox's rows arrive as the outbox's own.
-- It must publish the outbox and nothing else: the relay refuses to skip rows.
-- (Logical messages from pg_logical_emit_message need no publication entry: the relay
-- asks for them with the `messages 'true'` replication option.)
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'outbox_relay') THEN
    CREATE PUBLICATION outbox_relay FOR TABLE public.outbox
      WITH (publish = 'insert, update, delete', publish_via_partition_root = true);
  END IF;
END
$$;
