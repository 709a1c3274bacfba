"""``atajo keys create | list | rotate | revoke`` and ``atajo tenants set | list`` against a running gateway."""

from __future__ import annotations

import re

import httpx
from click.testing import CliRunner

from atajo.cli.main import cli
from tests.conftest import GatewayFactory

MASTER = "sk-cli-keys-master"


def _works(url: str, secret: str) -> int:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(
        url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"}
    ).status_code


def test_keys_and_tenants_cli(gateway: GatewayFactory) -> None:
    url = gateway({"auth": {"master_key": MASTER}}).url
    run = CliRunner().invoke
    env = {"ATAJO_URL": url, "ATAJO_MASTER_KEY": MASTER}
    made = run(cli, ["keys", "create", "--tenant", "acme", "--name", "web", "--rpm", "100", "--tpm", "5000"], env=env)
    assert made.exit_code == 0, made.output
    key_id = re.search(r"id:\s+(key_\w+)", made.output)
    secret = re.search(r"key:\s+(sk-atajo-\S+)", made.output)
    assert key_id and secret
    assert _works(url, secret[1]) == 200

    listed = run(cli, ["keys", "list"], env=env)
    assert listed.exit_code == 0 and key_id[1] in listed.output and "rpm 100" in listed.output
    assert secret[1] not in listed.output

    rotated = run(cli, ["keys", "rotate", key_id[1]], env=env)
    new = re.search(r"key:\s+(sk-atajo-\S+)", rotated.output)
    assert rotated.exit_code == 0 and new and new[1] != secret[1]
    assert _works(url, secret[1]) == 401 and _works(url, new[1]) == 200

    assert run(cli, ["keys", "revoke", key_id[1]], env=env).exit_code == 0
    assert _works(url, new[1]) == 401
    assert key_id[1] not in run(cli, ["keys", "list"], env=env).output
    assert key_id[1] in run(cli, ["keys", "list", "--all"], env=env).output

    assert run(cli, ["tenants", "set", "acme", "--rpm", "7", "--fixed"], env=env).exit_code == 0
    assert '"rpm": 7' in run(cli, ["tenants", "list"], env=env).output

    wrong = run(cli, ["keys", "list"], env={**env, "ATAJO_MASTER_KEY": "sk-wrong"})
    assert wrong.exit_code == 1 and "401" in wrong.output
    missing = run(cli, ["keys", "revoke", "key_0000000000000000"], env=env)
    assert missing.exit_code == 1 and "404" in missing.output
