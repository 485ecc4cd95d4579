-- Version 5: the rows every batch updates in place (balances, period and
-- free-use counts) leave room on their pages, so that an update can stay
-- on its page without touching the indexes (a HOT update) instead of
-- adding index entries on every batch.
ALTER TABLE balances SET (fillfactor = 50);
ALTER TABLE period_uses SET (fillfactor = 50);
ALTER TABLE free_uses SET (fillfactor = 50);
