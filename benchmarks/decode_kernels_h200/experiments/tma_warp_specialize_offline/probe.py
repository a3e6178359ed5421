import sys, re, collections
import os
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "..", "tests", "cpu")); sys.path.insert(0, HERE)
import test_triton_interpret as T
import absorb_ws as A
p="*bf16"
ptrs = dict(Q=p, QR=p, C=p, KR=p, LENS="*i64", OPART="*fp32", LSE="*fp32", OUT=p)
for ws, bm, bn, nw, st in [(False,32,64,4,2),(True,32,64,4,2),(False,64,64,8,2),(True,64,64,8,2),(False,32,32,4,3),(True,32,32,4,3)]:
    consts=dict(R=512, DR=64, BLOCK_M=bm, BLOCK_N=bn, DIRECT=False, WS=ws, STAGES=st)
    try:
        shared, rep = T._compile_sm90(A.absorb_ws_kernel, ptrs, ("nsplit","H","S","cap"), consts, nw, st)
    except Exception as e:
        print(ws,bm,bn,nw,st,"FAIL", str(e).splitlines()[-1][:300] if str(e) else repr(e)[:300]); continue
    ptx=T._LAST_PTX[0]
    regs = re.search(r"Used (\d+) registers", rep); spill = re.search(r"(\d+) bytes spill stores", rep)
    c=collections.Counter({k: ptx.count(k) for k in ["cp.async.bulk.tensor","wgmma.mma_async","mma.sync","setmaxnreg","mbarrier.try_wait"]})
    print(f"ws={ws} bm={bm} bn={bn} nw={nw} st={st} smem={shared} regs={regs.group(1) if regs else '?'} spill={spill.group(1) if spill else '?'}", dict(c))
