-- Scoped API keys and device revocation (issue 10, items 7 and 8).
--
-- An 'admin' key does everything an organization may do (every key created
-- before this migration is one). An 'enroll' key may only register devices:
-- into the device groups it is bound to, until expires_at, and at most
-- max_devices of them. devices_registered counts its registrations; it is
-- raised by a guarded UPDATE in the registering transaction, so concurrent
-- registrations cannot pass max_devices.
ALTER TABLE api_keys
    ADD COLUMN scope text NOT NULL DEFAULT 'admin' CHECK (scope IN ('admin', 'enroll')),
    ADD COLUMN expires_at timestamptz,
    ADD COLUMN max_devices integer CHECK (max_devices >= 1),
    ADD COLUMN devices_registered integer NOT NULL DEFAULT 0,
    ADD COLUMN device_group_ids text[] NOT NULL DEFAULT '{}',
    ADD CONSTRAINT api_keys_devices_registered_check
        CHECK (devices_registered >= 0 AND devices_registered <= coalesce(max_devices, devices_registered));

-- Which key registered a device (null: before this migration) and why it was revoked.
-- Capabilities were nullable from the start: a device may not know its free storage.
ALTER TABLE devices
    ADD COLUMN registered_by_key text REFERENCES api_keys (id),
    ADD COLUMN revoke_reason text;
