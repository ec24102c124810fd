"""The README's main command, run exactly as written: it writes its JSON and its plot, verifies every case,
and every method its table prints has records (and the other way round).

On a CPU-only machine the command runs the host TCP path with its small default shape (seconds on
two cores); on two GPUs it runs the W1 shape.
"""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW = re.compile(r"^(?P<method>\S.*?)\s+(?P<tokens>\d+)\s+(?P<bytes>\d+)\s+\d")  # method names hold spaces
LEGEND = re.compile(r"^# (?P<name>[^=]+?)\s+= ")


def main_command() -> str:
    """The first line of a fenced bash block in README.md that runs kvlink.bench."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.S | re.M)
    for block in blocks:
        for line in block.splitlines():
            if line.startswith("python -m kvlink.bench"):
                return line.split("  #")[0].strip()  # a trailing comment is no part of the command
    raise AssertionError("README.md has no fenced bash block with `python -m kvlink.bench`")


def parse_table(stdout: str) -> tuple[list[tuple[str, int]], set[str]]:
    """(method, tokens) of each row of the summary table, and the names its legend explains."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method ") and "tokens" in line)
    rows, legend = [], set()
    for line in lines[header + 1:]:
        if line.startswith("#"):
            match = LEGEND.match(line)
            if match:
                legend.add(match["name"])
            continue
        match = ROW.match(line)
        if match and not legend:  # rows come before the comment lines
            rows.append((match["method"], int(match["tokens"])))
    return rows, legend


def test_readme_main_command_writes_its_files_and_verifies_every_case(tmp_path):
    command = main_command()
    assert "--json bench.json" in command and "--plot bench.png" in command, command  # the files checked below
    if shutil.which("python") is None:  # the README says `python`; only where there is none, use this one
        command = shlex.quote(sys.executable) + command[len("python"):]
    result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"

    png = tmp_path / "bench.png"
    assert png.is_file() and png.stat().st_size > len(PNG_MAGIC), "no bench.png"
    assert png.read_bytes()[:len(PNG_MAGIC)] == PNG_MAGIC, "bench.png is not a PNG"

    report = json.loads((tmp_path / "bench.json").read_text())
    records = report["records"]
    assert records, "bench.json holds no records"
    unverified = [r for r in records if r.get("verified") is not True]
    assert not unverified, unverified
    assert report["verified"] is True

    rows, legend = parse_table(result.stdout)
    assert rows, result.stdout
    table_methods = {method for method, _ in rows}
    json_methods = {r["method"] for r in records}
    assert table_methods == json_methods, (table_methods, json_methods)  # each printed method has an entry, and back
    assert sorted(rows) == sorted((r["method"], r["tokens"]) for r in records)  # one row per record
    assert table_methods <= legend, f"methods without a legend line: {table_methods - legend}"
    assert re.search(r"median of \d+ timed iterations? after \d+ untimed warm-ups?", result.stdout)
