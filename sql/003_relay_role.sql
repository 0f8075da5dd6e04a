-- A least-privilege role for the relay. Give it a password out of band:
--   ALTER ROLE outbox_relay PASSWORD '…';   (or use a password_file / a Secret)
-- Polling mode needs SELECT and DELETE on the outbox; log mode needs REPLICATION and
-- SELECT (for the first-start snapshot), and DELETE only with `cleanup = true`.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outbox_relay') THEN
    CREATE ROLE outbox_relay LOGIN REPLICATION;
  END IF;
END
$$;
GRANT USAGE ON SCHEMA public TO outbox_relay;
GRANT SELECT, DELETE ON public.outbox TO outbox_relay;
