-- The relay's own state, next to the data, so that a new pod, a standby that takes over
-- or a restarted process knows what an earlier run knew. The relay creates these tables
-- itself when its role may (CREATE on the schema), and migrates them; a relay older
-- than the version recorded here refuses to start. Schema: source.state_schema.
CREATE TABLE IF NOT EXISTS public.outbox_relay_schema (
  singleton   boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
  version     integer     NOT NULL,
  migrated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO public.outbox_relay_schema (version) VALUES (1) ON CONFLICT DO NOTHING;
-- Log mode: one row per slot the relay has had. Written once a first start has made the
-- real slot, so a slot missing later is known to be lost, not new.
CREATE TABLE IF NOT EXISTS public.outbox_relay_slots (
  slot_name        text        PRIMARY KEY,
  publication      text        NOT NULL,
  first_started_at timestamptz NOT NULL DEFAULT now(),
  -- What made the publication carry the outbox when the relay last checked (catalog
  -- OIDs and row versions): any change means rows may have been skipped by the server.
  carried_by       text        NOT NULL,
  -- The last point the relay vouched for: the slot was flushed to vouched_lsn only
  -- after the publication was checked; rows whose transaction is newer than
  -- vouched_xmin are the ones to look at if it changed.
  vouched_lsn      pg_lsn      NOT NULL,
  vouched_xmin     bigint      NOT NULL,
  vouched_at       timestamptz NOT NULL DEFAULT now(),
  -- Set by `outbox-relay slot forget`: the operator dropped the slot on purpose.
  forgotten_at     timestamptz
);
GRANT SELECT, INSERT, UPDATE ON public.outbox_relay_schema, public.outbox_relay_slots TO outbox_relay;
