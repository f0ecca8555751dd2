import torch, sys
sys.path[:0]=['src','bench']
import torch.nn.functional as F
import cmoe
from cmoe.core.activations import activation_marks, activation_rate
from cmoe.core.grouping import group_neurons
HO=2048; cfg=cmoe.CarveConfig.from_name("S8A24E64"); k=cfg.active
def rel(a,b): return float((a-b).norm()/b.norm())
for L in [2,10,18,26]:
    d=torch.load(f"/tmp/study/layer{L}.pt"); x,G,U,D=[d[n].detach() for n in ("x","gate","up","down")]
    h=F.silu(x@G.T)*(x@U.T); dn=D.norm(dim=0); y=h@D.T; I=h.shape[1]; hf,ht=h[:-HO],h[-HO:]; yt=y[-HO:]
    out=[]
    for name,score in (("contrib",hf.abs().mean(0)*dn),("fluct",hf.var(0)*dn**2),("rate",None)):
        if score is None: continue
        keep=torch.zeros(I,dtype=torch.bool); keep[score.topk(I//2).indices]=True
        bias=(hf[:,~keep].mean(0))@D[:,~keep].T
        out.append(f"static-{name} {rel((ht*keep)@D.T,yt):.3f} +mean {rel((ht*keep)@D.T+bias,yt):.3f}")
    marks=activation_marks(h.abs()*dn, round(0.25*I)); groups=group_neurons(marks, activation_rate(marks), cfg)
    routed, shared = groups.routed, groups.shared
    N=torch.stack([(h[:,g]@D[:,g].T).norm(dim=-1) for g in routed],-1); Nf=N[:-HO]
    Tn=Nf/Nf.norm(dim=-1,keepdim=True); Xa=torch.cat([x,torch.ones(len(x),1)],1)
    W=torch.linalg.solve(Xa[:-HO].T@Xa[:-HO]+1e-3*torch.eye(577),Xa[:-HO].T@Tn)
    ch=(Xa@W).topk(k,-1).indices
    keep=torch.zeros(len(x),I,dtype=torch.bool); keep[:,shared]=True; keep.scatter_(1,routed[ch].reshape(len(x),-1),True)
    yhat=(h*keep)@D.T; R=y-yhat
    # per-expert conditional mean when unchosen
    Y=torch.stack([h[:,g]@D[:,g].T for g in routed],1)  # [T,E,H]
    unch=torch.ones(len(x),cfg.routed,dtype=torch.bool); unch.scatter_(1,ch,False)
    m=(Y[:-HO]*unch[:-HO,:,None]).sum(0)/unch[:-HO].sum(0)[:,None]
    comp=(unch[-HO:].float()@m)
    glob=R[:-HO].mean(0)
    out.append(f"ridge S8A24E64 {rel(yhat[-HO:],yt):.3f} +globalmean {rel(yhat[-HO:]+glob,yt):.3f} +condmean {rel(yhat[-HO:]+comp,yt):.3f}")
    for r in (16,64):
        C=torch.linalg.lstsq(Xa[:-HO],R[:-HO]).solution  # [577,H]
        Uc,s,Vt=torch.linalg.svd(Xa[:-HO]@C,full_matrices=False)
        P=torch.linalg.lstsq(Xa[:-HO],Uc[:,:r]*s[:r]).solution  # x->r
        out.append(f"+lowrank{r} {rel(yhat[-HO:]+Xa[-HO:]@P@Vt[:r],yt):.3f}")
    print(f"L{L}: "+" | ".join(out),flush=True)
