-- Cheaper keys on the hot path.
--
-- 1. The hot tables drop their foreign keys to numbers: a key check costs a lookup and a row
--    lock per written row. Every write to them holds its number's fence FOR SHARE and the
--    number FOR KEY SHARE once per batch instead, and removing a number deletes their rows.
-- 2. Identifiers (numbers, JIDs, message ids) compare byte by byte (COLLATE "C"): they are not
--    words, and the database's locale collation costs a strcoll per index comparison.
ALTER TABLE inbound DROP CONSTRAINT inbound_number_fkey;
ALTER TABLE outbox DROP CONSTRAINT outbox_number_fkey;
ALTER TABLE conversations DROP CONSTRAINT conversations_number_fkey;

ALTER TABLE numbers ALTER COLUMN number TYPE TEXT COLLATE "C";
ALTER TABLE fences ALTER COLUMN number TYPE TEXT COLLATE "C";
ALTER TABLE sessions ALTER COLUMN number TYPE TEXT COLLATE "C";
ALTER TABLE contacts
    ALTER COLUMN number TYPE TEXT COLLATE "C",
    ALTER COLUMN contact TYPE TEXT COLLATE "C";
ALTER TABLE conversations
    ALTER COLUMN number TYPE TEXT COLLATE "C",
    ALTER COLUMN chat TYPE TEXT COLLATE "C";
ALTER TABLE inbound
    ALTER COLUMN number TYPE TEXT COLLATE "C",
    ALTER COLUMN chat TYPE TEXT COLLATE "C",
    ALTER COLUMN sender TYPE TEXT COLLATE "C",
    ALTER COLUMN message_id TYPE TEXT COLLATE "C";
ALTER TABLE outbox
    ALTER COLUMN number TYPE TEXT COLLATE "C",
    ALTER COLUMN message_id TYPE TEXT COLLATE "C";
ALTER TABLE ai_jobs ALTER COLUMN number TYPE TEXT COLLATE "C";
