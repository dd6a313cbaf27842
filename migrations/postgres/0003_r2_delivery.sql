-- Revision 2 of the delivery path.
--
-- 1. Messages a person sent from the account's phone are recorded in the inbound log (processed,
--    never answered); `from_me` tells them from a contact's.
-- 2. A reply in a group quotes a message by id and sender: `reply_to_sender`.
ALTER TABLE inbound ADD COLUMN from_me BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE outbox ADD COLUMN reply_to_sender TEXT COLLATE "C";
