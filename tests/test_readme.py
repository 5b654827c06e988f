"""Every Python block of the READMEs runs as written, so a README that drifts from the code
fails the suite.

Each fenced ``python`` block of README.md and adapters/*/README.md is one test. It runs in
a fresh directory holding the sample ``policies.yaml`` (examples/policies.yaml), with the
block's own imports only. A block may say, in an HTML comment right above its fence, what
it is given from outside (the README's text says the same to the reader)::

    <!-- readme-test: given stripe_client payment_intent model=agents:issue_refund -->

* ``stripe_client``: a real ``stripe.StripeClient`` (on a local localstripe server);
* ``payment_intent``: the id of a paid $500.00 PaymentIntent to refund;
* ``model=agents:TOOL`` / ``model=langchain:TOOL``: a scripted model (no network) that
  asks for a $20.00 refund of ``payment_intent`` with ``TOOL`` six times, then answers;
* ``proxy``: the walkthrough's setting for the agent script: a ``paymaster proxy``
  process (on a free port, which replaces the README's ``127.0.0.1:8421`` in the block)
  over localstripe and a ledger with the sample policy, a vault key for ``refund-agent``
  in ``agent.key``, and ``sys.argv[1]`` the payment to refund.

``<!-- readme-test: skip REASON -->`` leaves a block out; the reason is the skip's.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from paymaster import Governor, load_policies
from paymaster._vault import VaultKeys
from paymaster.testing.localstripe import LocalStripe, run_localstripe
from paymaster.testing.proxy import run_proxy

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", *sorted(ROOT.glob("adapters/*/README.md"))]
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_MARKER = re.compile(r"<!-- readme-test: (given|skip) ?(.*?) -->\s*$")
#: The proxy's address in the README's walkthrough.
_WALKTHROUGH_PROXY = "http://127.0.0.1:8421"


@dataclass(frozen=True)
class Block:
    readme: Path
    line: int
    code: str
    given: tuple[str, ...]
    skip: str | None

    @property
    def name(self) -> str:
        return f"{self.readme.relative_to(ROOT)}:{self.line}"


def _blocks() -> list[Block]:
    found = []
    for readme in READMES:
        text = readme.read_text()
        for fence in _FENCE.finditer(text):
            line = text.count("\n", 0, fence.start()) + 1
            before = text[: fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = _MARKER.search(before)
            given: tuple[str, ...] = ()
            skip = None
            if marker and marker.group(1) == "given":
                given = tuple(marker.group(2).split())
            elif marker:
                skip = marker.group(2) or "marked skip"
            found.append(Block(readme, line, fence.group(1), given, skip))
    return found


BLOCKS = _blocks()


def test_the_readmes_have_python_blocks() -> None:
    assert len(BLOCKS) >= 8
    elided = re.compile(r"[(\[{=,:]\s*\.\.\.\s*[)\]},]|^\s*\.\.\.\s*$", re.M)
    assert not [b.name for b in BLOCKS if b.skip is None and elided.search(b.code)], (
        "a block that runs must not elide code with ..."
    )


@pytest.fixture(scope="module")
def stripe_server() -> Iterator[LocalStripe]:
    with run_localstripe() as server:
        yield server


def _agents_model(tool: str, payment_intent: str) -> Any:
    from agents import set_tracing_disabled
    from agents.testing import ScriptedModel, assistant_message, function_call

    set_tracing_disabled(True)
    args: dict[str, Any] = {"payment_intent": payment_intent, "amount": 2000}
    if tool == "create_refund":
        args["reason"] = None
    turns = [[function_call(tool, args, call_id=f"call_{n}")] for n in range(6)]
    return ScriptedModel([*turns, [assistant_message("Done.")]])


def _langchain_model(tool: str, payment_intent: str) -> Any:
    from langchain_core.messages import AIMessage

    from paymaster_langchain.testing import ScriptedChatModel

    args = {"payment_intent": payment_intent, "amount": 2000}
    turns = [
        AIMessage("", tool_calls=[{"name": tool, "args": args, "id": f"call_{n}"}])
        for n in range(6)
    ]
    return ScriptedChatModel(messages=iter([*turns, AIMessage("Done.")]))


def _given(block: Block, server: LocalStripe) -> dict[str, Any]:
    client = server.client()
    intent = client.v1.payment_intents.create(
        params={
            "amount": 50000,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "confirm": True,
        }
    ).id
    names: dict[str, Any] = {}
    for item in block.given:
        name, _, spec = item.partition("=")
        if name == "stripe_client":
            names[name] = client
        elif name == "payment_intent":
            names[name] = intent
        elif name == "proxy":
            continue  # set up around the block, in the test
        elif name == "model":
            framework, _, tool = spec.partition(":")
            make = _agents_model if framework == "agents" else _langchain_model
            names[name] = make(tool, intent)
        else:
            raise AssertionError(f"{block.name}: unknown given {item!r}")
    return names


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_the_block_runs_as_written(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stripe_server: LocalStripe
) -> None:
    if block.skip is not None:
        pytest.skip(block.skip)
    shutil.copy(ROOT / "examples" / "policies.yaml", tmp_path / "policies.yaml")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__main__", **_given(block, stripe_server)}
    if "proxy" not in block.given:
        exec(compile(block.code, block.name, "exec"), namespace)
        return
    assert _WALKTHROUGH_PROXY in block.code, f"{block.name} does not use the proxy"
    db = f"sqlite:///{tmp_path / 'paymaster.db'}"
    with Governor(db, policies=load_policies("policies.yaml")) as ledger:  # the schema
        (tmp_path / "agent.key").write_text(
            VaultKeys(ledger.engine).create("refund-agent", by="readme").secret + "\n"
        )
    with run_proxy(db, "policies.yaml", stripe_server.url) as proxy:
        code = block.code.replace(_WALKTHROUGH_PROXY, proxy.url)
        monkeypatch.setattr("sys.argv", ["agent.py", namespace["payment_intent"]])
        exec(compile(code, block.name, "exec"), namespace)
    with Governor(db, policies=load_policies("policies.yaml")) as ledger:
        refunds = [r for r in ledger.audit.query() if r.endpoint == "/v1/refunds"]
        # $25 a call and $100 a day: five $20.00 refunds, then the cap refuses the sixth.
        assert [r.outcome for r in refunds] == ["allowed"] * 5 + ["denied"]


def test_the_quickstart_policy_is_the_sample_policy_file(tmp_path: Path) -> None:
    """The README shows the policy its blocks run with (examples/policies.yaml)."""
    from paymaster import load_policies

    shown = re.search(r"^```yaml\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert shown is not None
    (tmp_path / "shown.yaml").write_text(shown.group(1))
    sample = ROOT / "examples" / "policies.yaml"
    shown_policies = list(load_policies(tmp_path / "shown.yaml"))
    assert shown_policies and shown_policies == list(load_policies(sample))
