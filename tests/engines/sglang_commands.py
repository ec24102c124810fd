'''The SGLang section of docs/engines.md, and how the tests read its commands.

``SECTION`` is the text of that section; ``test_sglang_docs.py`` parses every
``python -m sglang.launch_server`` command in it (and in docs/engines.md, once the file is
there) with SGLang's own ``prepare_server_args``, after ``load_plugins()``, as
``python -m sglang.launch_server`` does.
'''

import re
import shlex

SECTION = r"""## SGLang

Installing kvlink into SGLang's environment registers kvlink's SGLang plug-in (the entry point
`kvlink` in the group `sglang.srt.plugins`). SGLang runs it in the launcher, the engine and
every scheduler process, so `--disaggregation-transfer-backend kvlink` works with an unpatched
SGLang 0.5.23. If you set `SGLANG_PLUGINS`, include `kvlink` in it.

```bash
pip install kvlink            # with the GPU extra that matches your CUDA, e.g. kvlink[cuda13]

# prefill: 2 GPUs (TP 2); its bootstrap server listens on 8998
python -m sglang.launch_server --model-path meta-llama/Llama-3.1-8B-Instruct \
    --disaggregation-mode prefill --disaggregation-transfer-backend kvlink \
    --disaggregation-bootstrap-port 8998 --tp-size 2 --host 0.0.0.0 --port 30000

# decode: 4 other GPUs (TP 4); prefill and decode TP may differ either way
python -m sglang.launch_server --model-path meta-llama/Llama-3.1-8B-Instruct \
    --disaggregation-mode decode --disaggregation-transfer-backend kvlink \
    --tp-size 4 --base-gpu-id 2 --host 0.0.0.0 --port 30001

# the router sends each request to both, with one bootstrap room
python -m sglang_router.launch_router --pd-disaggregation \
    --prefill http://127.0.0.1:30000 8998 --decode http://127.0.0.1:30001 --host 0.0.0.0 --port 8000
```

What kvlink does: the prefill ranks register with the bootstrap server when SGLang builds
them; a decode rank links to the prefill ranks holding its KV heads, names its pages, pulls
them once the prefill has computed them, and then writes the request's metadata row (the first
token, which opens SGLang's metadata gate) and any state rows (sliding-window layers). The
prefill frees its pages once every decode rank that reads them has confirmed. With `--host
0.0.0.0` kvlink advertises SGLang's `get_local_ip_auto()` (set `SGLANG_HOST_IP` to choose).
`KVLINK_TRANSPORT` picks the transport (`auto`: CUDA IPC between GPUs of one host, else NCCL,
else TCP through the host; or `ipc`, `nccl`, `host`).

Failures and aborts: an abort on either side fails the request on the other at its next poll,
so both free their pages at once; on decode, pages come back only once no pull can still write
them (SGLang's deferred release, on by default). A decode rank whose link drops frees the
prefill's pages at once; the prefill's lease, `SGLANG_DISAGGREGATION_WAITING_TIMEOUT`
(300 s), is the last resort for one that vanishes without a word. `SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT`
bounds the wait for the other side's metadata. A failed request ends with an error naming its
bootstrap room and the reason (page size, KV dtype or geometry mismatch, abort, timeout);
nothing kvlink does raises into SGLang's scheduler, and no network call (HTTP, link handshake)
runs in a scheduler step. The first request to a new prefill instance waits up to a second
for SGLang's next lookup of it.

Limits: both sides need kvlink; the same `--page-size` and `--kv-cache-dtype`; no pipeline or
context parallelism; data-parallel attention on prefill with `--load-balance-method
follow_bootstrap_room` (SGLang's default for a PD prefill); state buffers (sliding window,
Mamba, DSA) only between equal TP sizes (other requests fail with that reason); draft-model
layers of the target's KV geometry; no host (CPU) destinations on decode, no staging buffer
(`SGLANG_DISAGG_STAGING_BUFFER`); `prefill_complete` allocation behaves as `early`.
"""


def commands(text: str) -> list[str]:
    """Every shell command in the fenced bash blocks of ``text`` (continuation lines joined)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.strip().startswith("#") else ""
            if line:
                found.append(line)
    return found


def launch_server_argv(command: str) -> list[str] | None:
    """The arguments of a ``python -m sglang.launch_server`` command (None for other commands)."""
    words = shlex.split(command)
    if words[:3] == ["python", "-m", "sglang.launch_server"]:
        return words[3:]
    return None


def section_of(markdown: str, title: str = "SGLang") -> str | None:
    """The section of ``markdown`` whose heading is ``title`` (up to the next heading of its level
    or above; ``#`` lines inside fenced code blocks are shell comments, not headings)."""
    lines = markdown.splitlines(keepends=True)
    fenced, level, section = False, None, []
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"(#+) (.*?)\s*$", line)
        if level is None:
            if heading and heading.group(2) == title:
                level, section = len(heading.group(1)), [line]
            continue
        if heading and len(heading.group(1)) <= level:
            break
        section.append(line)
    return "".join(section) if level is not None else None