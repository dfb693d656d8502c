"""Carry the shipped file's draft head (tensors and metadata entry) unchanged into the new adapter file."""
import sys, json
from safetensors import safe_open
from safetensors.torch import save_file
src, dst = sys.argv[1], sys.argv[2]
with safe_open(src, "pt") as f:
    smeta = dict(f.metadata()); draft = {k: f.get_tensor(k) for k in f.keys() if k.startswith("draft.")}
with safe_open(dst, "pt") as f:
    dmeta = dict(f.metadata()); tensors = {k: f.get_tensor(k) for k in f.keys()}
assert "draft.A" in draft and "moe_offload_draft" in smeta and not any(k.startswith("draft.") for k in tensors)
fp_new = json.loads(dmeta["moe_offload_accelerator"])["fingerprint"]
assert json.loads(smeta["moe_offload_draft"])["fingerprint"] == fp_new, "draft head is for another model"
tensors.update(draft)
dmeta["moe_offload_draft"] = smeta["moe_offload_draft"]
save_file(tensors, dst + ".partial", metadata=dmeta)
import os; os.replace(dst + ".partial", dst)
print("draft head carried:", sorted(draft), json.loads(smeta["moe_offload_draft"]).get("exit_layer"))
