"""The README's curl, OpenAI-client and Engine examples run as written
(against a test server on a free port instead of 30000)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from server_helpers import start_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks(language: str) -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(rf"```{language}\n(.*?)```", f.read(), re.S)


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    srv = start_server(tiny_qwen3, tmp_path_factory.mktemp("logs"), "--tool-call-parser", "qwen25")
    yield srv
    srv.stop()


def test_curl_example(server):
    (curl,) = [b for b in readme_blocks("bash") if b.startswith("curl")]
    out = subprocess.run(curl.replace("127.0.0.1:30000", server.url.removeprefix("http://")),
                         shell=True, capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout)["meta_info"]["completion_tokens"] == 16


def test_openai_and_engine_examples(server):
    openai_example, engine_example, structured_example, tools_example = readme_blocks("python")
    here = server.url.removeprefix("http://")
    for code in (openai_example.replace("127.0.0.1:30000", here), engine_example,
                 structured_example.replace("127.0.0.1:30000", here), tools_example.replace("127.0.0.1:30000", here)):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip()
