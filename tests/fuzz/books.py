"""After fuzzing: every organization's books balance, read straight from the
service's SQLite file. For each organization the stored balance equals the
sum of its ledger rows, the last row's balance_after and the remaining
credits of its live lots; its held credits equal its open holds; each
ledger row's per-lot allocations add up to its amount; nothing is negative.
Prints one line per organization; exits 1 on the first difference.

Usage: python3 books.py PATH_TO_SQLITE_FILE
"""

import sqlite3
import sys

db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
q = lambda sql, *args: db.execute(sql, args).fetchall()  # noqa: E731
failures = []

orgs = q("SELECT id, external_id, balance_micros, held_micros, ledger_seq FROM organizations")
for org_id, name, balance, held, seq in orgs:
    (ledger_sum, rows, max_seq), = q(
        "SELECT coalesce(sum(amount_micros), 0), count(*), coalesce(max(seq), 0)"
        " FROM ledger_transactions WHERE org_id = ?", org_id)
    last = q("SELECT balance_after_micros FROM ledger_transactions WHERE org_id = ?"
             " ORDER BY seq DESC LIMIT 1", org_id)
    (lots,), = q("SELECT coalesce(sum(remaining_micros), 0) FROM credit_lots"
                 " WHERE org_id = ? AND kind != 'pending'", org_id)
    (open_holds,), = q("SELECT coalesce(sum(held_micros), 0) FROM reservations"
                       " WHERE org_id = ? AND status = 'open'", org_id)
    off = q("SELECT t.id FROM ledger_transactions t LEFT JOIN lot_allocations a"
            " ON a.transaction_id = t.id WHERE t.org_id = ?"
            " GROUP BY t.id, t.amount_micros"
            " HAVING coalesce(sum(a.amount_micros), 0) != t.amount_micros", org_id)
    checks = {
        "balance = Σ ledger rows": balance == ledger_sum,
        "balance = last balance_after": balance == (last[0][0] if last else 0),
        "balance = Σ remaining of live lots": balance == lots,
        "held = Σ open holds": held == open_holds,
        "ledger_seq = rows, no gaps": seq == rows == max_seq,
        "allocations add up": not off,
        "nothing negative": balance >= 0 and held >= 0,
    }
    broken = [k for k, ok in checks.items() if not ok]
    print(f"{'FAIL' if broken else 'ok  '} books of {name}: balance {balance}, "
          f"{rows} ledger rows, lots {lots}, held {held}" + (f": {broken}" if broken else ""))
    if broken:
        failures.append(name)

if not orgs:
    print("FAIL books: no organization was written; the fuzzing reached nothing")
    sys.exit(1)
sys.exit(1 if failures else 0)
