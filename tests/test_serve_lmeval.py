"""lm-evaluation-harness end to end: a tiny multiple-choice loglikelihood task run through lm-eval's
`local-completions` against the server gets exactly the accuracy lm-eval's `hf` backend gets on the same
folder. Opt-in (lm-eval and its dependencies are ~500 MB): `pip install -e ".[lmeval]"` and
`MOE_OFFLOAD_LMEVAL=1 pytest tests/test_serve_lmeval.py`. tests/test_serve_api.py checks the same
loglikelihoods with raw HTTP against transformers' own logits in every CI run."""

import json
import os

import pytest

from moe_offload import runtime
from moe_offload.serve import ServeConfig
from test_serve import Server

pytestmark = [pytest.mark.lmeval,
              pytest.mark.skipif(os.environ.get("MOE_OFFLOAD_LMEVAL") != "1",
                                 reason="opt-in: MOE_OFFLOAD_LMEVAL=1 (needs pip install -e '.[lmeval]')")]

# (context, [choices], gold): KJV-style contexts, the right continuation and three wrong ones
DOCS = [
    ("In the beginning God created", [" the heaven and the earth.", " a great fish.", " the iron gate.", " seven loaves."], 0),
    ("And God said, Let there be", [" a sword.", " light: and there was light.", " many rivers.", " no bread."], 1),
    ("The LORD is my shepherd;", [" the sea is wide.", " he went away.", " I shall not want.", " and he slept."], 2),
    ("Blessed are the meek: for they", [" were afraid.", " went down.", " ate bread.", " shall inherit the earth."], 3),
    ("And the LORD said unto Moses,", [" Speak unto the children of Israel,", " the fig tree withered.", " a stone.", " at night."], 0),
    ("For God so loved the world,", [" that the sea was dry,", " that he gave his only begotten Son,", " and went home,", " in the field,"], 1),
    ("Our Father which art in heaven,", [" Hallowed be thy name.", " bring the cattle.", " sell the corn.", " the wall fell."], 0),
    ("And the earth was without form,", [" and full of gold;", " and void; and darkness was upon the face of the deep.", " and cold.", " and many."], 1),
    ("Honour thy father and thy mother:", [" that thy days may be long upon the land", " and the ships sailed", " for the fish swim", " and the oxen"], 0),
    ("I am the way, the truth,", [" and the gate of brass:", " and the river:", " and the life:", " and the mountain:"], 2),
    ("Thou shalt love thy neighbour", [" as the sea.", " with stones.", " in the morning.", " as thyself."], 3),
    ("Man shall not live by bread", [" alone, but by every word", " and water only", " or fish", " in the desert"], 0),
]

TASK = """task: tiny_kjv_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval_task")
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": ch, "gold": g}) + "\n" for c, ch, g in DOCS))
    (d / "tiny_kjv_mc.yaml").write_text(TASK.format(data=data))
    return d


def test_local_completions_accuracy_equals_hf_backend(task_dir):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    folder = str(runtime.load(device="cpu", offload=False).path)
    om = runtime.load(device="cpu", cache_per_layer=4)  # served offloaded: the numbers must not move
    s = Server(om, ServeConfig(max_batch=4))
    try:
        tm = TaskManager(include_path=str(task_dir))
        served = lm_eval.simple_evaluate(
            model="local-completions", tasks=["tiny_kjv_mc"], task_manager=tm,
            model_args=f"base_url={s.url}/v1/completions,model=moe-offload,tokenizer={folder},"
                       "tokenized_requests=True,add_bos_token=True,num_concurrent=1,max_retries=1,batch_size=4")
        hf = lm_eval.simple_evaluate(model="hf", tasks=["tiny_kjv_mc"], task_manager=tm,
                                     model_args=f"pretrained={folder},dtype=float32", device="cpu")
    finally:
        s.stop()
    a = served["results"]["tiny_kjv_mc"]["acc,none"]
    b = hf["results"]["tiny_kjv_mc"]["acc,none"]
    print(f"lm-eval tiny_kjv_mc acc: local-completions (server) {a:.4f}, hf backend {b:.4f}")
    assert a == b
