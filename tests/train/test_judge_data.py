"""The default model's judges: their generated data and the committed adapters' provenance.

The data is what `python -m checkpoints.train_judges` trains on and `bench.judge_accuracy` measures
held-out accuracy with; the committed adapters must be what its flags make.
"""

import functools
import json
import re
from collections import Counter

import pytest

from checkpoints import train_judges as tj
from server import cli

SUBJECT = {  # relation -> the question's subject, from any phrasing of `_qa`
    "capital": re.compile(r"capital of (.+?)[?]"),
    "language": re.compile(r"(?:speak in|language of) (.+?)[?]"),
    "continent": re.compile(r"(?:is|continent is) (.+?)(?: in)?[?]"),
}


def _relation_subject(question: str) -> tuple[str, str]:
    for relation in ("capital", "language", "continent"):
        m = SUBJECT[relation].search(question)
        if m and (relation != "continent" or "continent" in question):
            return relation, m.group(1)
    raise AssertionError(f"no known phrasing: {question!r}")


class _Pick:
    """Stands in for the generator's choice of phrasing: always option k."""

    def __init__(self, k: int):
        self.k = k

    def integers(self, n: int) -> int:
        return min(self.k, n - 1)


def _stated_value(relation: str, subject: str, answer: str) -> str:
    """The value `answer` states: the one whose phrasing by `_qa` is `answer`, exactly."""
    stated = _phrasings(relation, subject).get(answer)
    assert stated is not None, answer
    return stated


@functools.cache
def _phrasings(relation: str, subject: str) -> dict[str, str]:
    """answer text -> the value it states, over every phrasing of every value of `relation`."""
    values = set(tj._facts(known_only=False)[relation].values())
    table: dict[str, set[str]] = {}
    for v in values:
        for k in range(3):
            table.setdefault(tj._qa(relation, subject, v, _Pick(k))[1], set()).add(v)
    return {a: vs.pop() for a, vs in table.items() if len(vs) == 1}


def test_correctness_data_is_balanced_true_to_its_labels_and_held_out_by_fact():
    data = tj.correctness_examples()
    assert data == tj.correctness_examples()  # deterministic: same seed, same examples
    facts = tj._facts()
    seen = {}
    for split, rows in data.items():
        assert Counter(r["response"] for r in rows) == {"Y": len(rows) // 2, "N": len(rows) // 2}
        for r in rows:
            question, answer = r["messages"][0]["content"], r["messages"][1]["content"]
            relation, subject = _relation_subject(question)
            assert subject in facts[relation], (subject, "a fact the model does not know is asked")
            assert subject not in tj.UNKNOWN.get(relation, ())
            stated = _stated_value(relation, subject, answer)
            assert (stated == facts[relation][subject]) == (r["response"] == "Y"), r
            seen.setdefault((relation, subject), set()).add(split)
    assert all(len(splits) == 1 for splits in seen.values())  # no fact is in both splits
    held = sum(1 for splits in seen.values() if "heldout" in splits)
    assert 0.15 <= held / len(seen) <= 0.25


def test_format_data_is_balanced_and_deterministic():
    data = tj.format_examples()
    assert data == tj.format_examples()
    for rows in data.values():
        counts = Counter(r["response"] for r in rows)
        assert abs(counts["Y"] - counts["N"]) <= len(rows) // 10


@pytest.mark.parametrize("name", sorted(tj.JUDGES))
def test_committed_judge_was_trained_with_the_scripts_flags(name):
    """The shipped adapter's training log holds the settings `train_judges.py` passes today, and the
    example counts of its data: rerunning the script retrains this judge, not another."""
    _, invocation = tj.JUDGES[name]
    argv = ["train", "--data", "d", "--output-dir", "o", "--invocation", invocation,
            *tj.COMMON_FLAGS, *tj.TRAIN_FLAGS[name]]  # fmt: skip
    args = vars(cli.build_parser().parse_args(argv))
    log = json.loads((tj.OUT / name / "training_log.json").read_text())
    ignored = {"model", "data", "output_dir", "eval_data", "resume", "progress"}
    for key, value in log["config"].items():
        if key in ignored or key not in args:
            continue
        want = args[key]
        assert (list(want) if isinstance(want, tuple) else want) == value, key
    data = tj.DATASETS[name]()
    assert (log["train_examples"], log["eval_examples"]) == (len(data["train"]), len(data["heldout"]))
    config = json.loads((tj.OUT / name / "adapter_config.json").read_text())
    assert config["invocation_string"] == invocation
    assert sorted(config["target_modules"]) == sorted(log["config"]["target_modules"])


@pytest.mark.parametrize("name", sorted(tj.JUDGES))
def test_a_rerun_writes_the_log_without_the_machines_paths(name, tmp_path):
    """What `jalora train` records (the resolved model file, temporary data files, absolute output directories)
    becomes what is shipped: the shipped log is what neutral_paths makes of such a log, byte for byte."""
    shipped = (tj.OUT / name / "training_log.json").read_text()
    log = json.loads(shipped)
    log["config"].update(model="/root/.cache/jalora/models/m.gguf", data=f"/tmp/tmpab12/{name}/train.jsonl",
                         eval_data=f"/tmp/tmpab12/{name}/heldout.jsonl", output_dir=str(tj.OUT / name))  # fmt: skip
    log["result"]["adapter_dir"] = str(tj.OUT / name)
    path = tmp_path / "training_log.json"
    path.write_text(json.dumps(log, indent=1))
    tj.neutral_paths(path, "smollm2", name, tj.OUT / name)
    assert path.read_text() == shipped
