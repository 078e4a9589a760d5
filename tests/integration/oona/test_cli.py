from __future__ import annotations

import json
from pathlib import Path

import pytest

from esper.cli import main
from esper.errors import FailedPreconditionError
from esper.oona.cli import nats_url_from
from esper.oona.envelope import make_envelope
from esper.oona.natsd import NatsServer
from esper.oona.publisher import Publisher
from generated.esper.oona.v1 import events_pb2 as ev

pytestmark = pytest.mark.integration


def test_esper_events_prints_a_run(natsd: NatsServer, tmp_path: Path, capsys) -> None:
    with Publisher(natsd.url) as pub:
        for i in range(2):
            pub.publish(
                make_envelope(
                    ev.RunStateChanged(state="running", detail=f"d{i}"),
                    run_id="cli1",
                    source="test",
                    sequence=i,
                )
            )
        assert pub.flush(10)
    (tmp_path / "endpoints.json").write_text(json.dumps({"nats_url": natsd.url}))
    rc = main(["events", "--run", "cli1", "--data-dir", str(tmp_path), "--idle-timeout", "0.5"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(lines) == 2
    assert lines[0].startswith("#0") and 'detail: "d1"' in lines[1]


def test_no_running_platform_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FailedPreconditionError, match="esper up --data-dir"):
        nats_url_from(tmp_path)
    assert main(["events", "--run", "x", "--data-dir", str(tmp_path)]) == 2
