-- Writers no longer pin data keys with SELECT ... FOR KEY SHARE (a row lock
-- and its WAL record per key and batch); they take the erasure advisory lock
-- shared instead (ledger/src/store/protection.rs, ERASURE_LOCK). The column
-- privilege that FOR KEY SHARE needed goes: least privilege.
REVOKE UPDATE (rewrapped_at) ON subject_keys FROM audit_writer;
