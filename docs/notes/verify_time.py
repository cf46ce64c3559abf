"""Wall time of one verify, Shallow Diffuse against Tree-Ring, side by side in one process (one torch
thread, 8 generated images, 3 alternating rounds): OMP_NUM_THREADS=1 python docs/notes/verify_time.py"""
import time, torch, numpy as np
from shallowmark.core.backends import load_backend
from shallowmark.core.watermarks import load_method
from shallowmark.attacks.bench_config import bench_keys
torch.set_num_threads(1)
b = load_backend("tiny-ldm")
sd, tr = load_method("shallow-diffuse", b), load_method("tree-ring", b)
imgs = sd.generate([bench_keys(1, "shallow-diffuse")[0]], list(range(8)))
res = {"shallow-diffuse": [], "tree-ring": []}
for rnd in range(3):
    for name, m in (("shallow-diffuse", sd), ("tree-ring", tr)) if rnd % 2 == 0 else (("tree-ring", tr), ("shallow-diffuse", sd)):
        keys = bench_keys(1, name)
        t = time.perf_counter(); m.detect(imgs, keys); res[name].append((time.perf_counter() - t) / 8)
for k, v in res.items(): print(k, "s/image per round:", [round(x, 3) for x in v], "evals", load_method(k, b).model_evals().verify)
print("ratio SD/TR:", np.median(res["shallow-diffuse"]) / np.median(res["tree-ring"]))
