"""The store's lists of writable columns match the schema its migrations build.

`patchrelay.ISSUE_COLUMNS` / `RUN_COLUMNS` are the columns `Store.insert_issue` / `update_issue` /
`update_run` accept from callers. They must name every column of the migrated table except the ones the
store fills in itself (ids, the row's owner and type, its timestamps): a column added by a migration
but missing from the list cannot be written, and a listed column the table lacks fails at the first write.
The names are read from the module at test time, so a renamed constant fails here, not at collection.
"""
import sqlite3

import pytest

import patchrelay

# table -> (the module's name for its writable columns, the columns only the store itself sets)
STORE_SET = {
    "issues": ("ISSUE_COLUMNS", {"id", "created_at", "updated_at"}),
    "runs": ("RUN_COLUMNS", {"id", "issue_id", "run_type", "claimed_at"}),
}


@pytest.fixture
def store(tmp_path):
    """A fresh database: every migration run by opening it."""
    s = patchrelay.Store(tmp_path / "state" / "patchrelay.sqlite")
    yield s
    s.close()


def writable(name):
    cols = getattr(patchrelay, name, None)
    assert cols is not None, f"patchrelay.{name} is gone"
    return set(cols)


def table_columns(path, table):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
    finally:
        con.close()


@pytest.mark.parametrize("table", STORE_SET)
def test_writable_columns_are_the_migrated_table_minus_what_the_store_sets(store, table):
    name, own = STORE_SET[table]
    assert store.schema_version() == len(patchrelay.MIGRATIONS)
    columns = table_columns(store.path, table)
    assert own <= columns, f"{table} lacks {sorted(own - columns)}"
    cols = writable(name)
    assert not cols & own, f"{name} lists columns the store sets itself: {sorted(cols & own)}"
    assert cols == columns - own, (f"{name} lacks {sorted(columns - own - cols)}; "
                                   f"lists columns {table} does not have: {sorted(cols - columns)}")


def test_the_store_writes_every_writable_column_and_refuses_the_ones_it_sets(store):
    """Every listed column can be written (here: set to the value it has), every store-set one is refused."""
    with store.tx():
        issue_id = store.insert_issue({"project_id": "app", "linear_id": "lin-1", "key": "APP-1",
                                       "factory_state": "delegated", "pending_run_type": "implementation",
                                       "pending_context": "{}"})
    run_id = store.claim_run(issue_id)
    assert run_id is not None
    for table, update, row_id in (("issues", store.update_issue, issue_id), ("runs", store.update_run, run_id)):
        name, own = STORE_SET[table]
        [row] = [dict(r) for r in store.db.execute(f"SELECT * FROM {table} WHERE id = ?", (row_id,))]
        for col in sorted(writable(name)):
            with store.tx():
                update(row_id, {col: row[col]})
        for col in sorted(own):
            with pytest.raises(patchrelay.StoreError, match="unknown .* columns"):
                update(row_id, {col: row[col]})
