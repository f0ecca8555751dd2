import torch, sys
sys.path[:0]=['src','bench']
import torch.nn.functional as F
import cmoe
from cmoe.core.activations import activation_marks, activation_rate
from cmoe.core.grouping import group_neurons
from cmoe.core.router_fit import expert_output_norms
HO=2048
cfg=cmoe.CarveConfig(budget=0.5).for_ffn(1536,3); k=cfg.active
def rel(a,b): return float((a-b).norm()/b.norm())
for L in [2,10,18,26]:
    d=torch.load(f"/tmp/study/layer{L}.pt"); x,G,U,D=[d[n].detach() for n in ("x","gate","up","down")]
    h=F.silu(x@G.T)*(x@U.T); dn=D.norm(dim=0); y=h@D.T; I=h.shape[1]
    marks=activation_marks(h.abs()*dn, round(0.25*I)); groups=group_neurons(marks, activation_rate(marks), cfg)
    routed, shared = groups.routed, groups.shared
    N=expert_output_norms(h,D,routed)
    Xa=torch.cat([x,torch.ones(len(x),1)],1); A=Xa[:-HO].T@Xa[:-HO]; A+=1e-4*A.diagonal()[:-1].mean()*torch.eye(577)
    def evalw(W):
        ch=(Xa[-HO:]@W).topk(k,-1).indices
        keep=torch.zeros(HO,I,dtype=torch.bool); keep[:,shared]=True; keep.scatter_(1,routed[ch].reshape(HO,-1),True)
        return rel((h[-HO:]*keep)@D.T, y[-HO:])
    out=[]
    oracle=N[-HO:].topk(k,-1).indices; keep=torch.zeros(HO,I,dtype=torch.bool); keep[:,shared]=True; keep.scatter_(1,routed[oracle].reshape(HO,-1),True)
    out.append(f"oracle {rel((h[-HO:]*keep)@D.T, y[-HO:]):.3f}")
    Nf=N[:-HO]
    targets={"unitnorm":Nf/Nf.norm(dim=-1,keepdim=True),"raw":Nf,"sq-unit":(Nf**2)/(Nf**2).sum(-1,keepdim=True),
             "log":Nf.clamp_min(1e-6).log(),"topk-ind":torch.zeros_like(Nf).scatter_(1,Nf.topk(k,-1).indices,1.0),
             "rank":Nf.argsort(-1).argsort(-1).float()/Nf.shape[1]}
    for n,T in targets.items():
        W=torch.linalg.solve(A,Xa[:-HO].T@T); out.append(f"{n} {evalw(W):.3f}")
    print(f"L{L}: "+" | ".join(out),flush=True)
