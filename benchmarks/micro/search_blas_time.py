# Times score_topk on the BLAS blocks (GRADKIT_SEARCH_ISA=blas): 100,000 x 256 fp32 keys, top-10, 1 and 1,000 queries,
# 2 threads; prints "<label> Q <Q> median ms <t>" (median of 5). Session 32 ran it alternately against a build of
# 067fefc (BLAS scores straight into the heap) and of the rescoring commit, 4 rounds each, and kept each minimum:
# benchmarks/results/intel-emr-avx512/search-blas-rescore-session32.txt. Usage: python search_blas_time.py LABEL
import os, time, torch, sys
os.environ["GRADKIT_SEARCH_ISA"] = "blas"
from gradkit import ops
torch.manual_seed(0)
torch.set_num_threads(2)
keys = torch.randn(100_000, 256)
for Q in (1, 1000):
    q = torch.randn(Q, 256)
    ops.score_topk(q, keys[:1000], 10)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter(); ops.score_topk(q, keys, 10); ts.append(time.perf_counter() - t0)
    print(sys.argv[1], "Q", Q, "median ms", sorted(ts)[2] * 1e3)
