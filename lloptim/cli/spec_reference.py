"""``lloptim spec-reference``: every key of a spec (type, unit, default, bounds), where errors point."""

from __future__ import annotations

import typer

from lloptim.cli.app import app
from lloptim.cli.common import console, print_json
from lloptim.cli.tables import Column, print_table


def _details(row: dict) -> str:
    head = [row["type"]]
    if row["unit"]:
        head.append(row["unit"])
    if row["bounds"]:
        head.append(row["bounds"])
    head.append("required" if row["default"] == "required" else f"default {row['default']}")
    return f"{'; '.join(head)}. {row['description']}"


@app.command("spec-reference")
def spec_reference_cmd(json_out: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Every key a TOML spec may hold: type, unit, default, bounds and meaning (read from the validator)."""
    from lloptim.spec import spec_reference

    rows = spec_reference()
    if json_out:
        print_json({"keys": rows})
        return
    tables = list(dict.fromkeys(r["table"] for r in rows))
    for k, table in enumerate(tables):
        if k:
            console.print()
        print_table(console, table, [Column("key", numeric=False), Column("type; unit; bounds; default. meaning",
                                                                           numeric=False)],
                    [[r["key"].rsplit(".", 1)[-1], _details(r)] for r in rows if r["table"] == table])
