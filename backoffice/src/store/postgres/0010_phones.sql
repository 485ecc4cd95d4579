-- Version 10: telephone numbers customers register (E.164, `+` and
-- digits, kept in the customer's record), by which a Parlay X service
-- names an end user (`tel:`): one customer per number, found by index.
CREATE UNIQUE INDEX customers_phone ON customers ((record ->> 'phone'))
    WHERE record ? 'phone';
