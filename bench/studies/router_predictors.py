import torch, sys, time
sys.path[:0]=['src','bench']
import torch.nn.functional as F
import cmoe
from cmoe.core.activations import activation_marks, activation_rate
from cmoe.core.grouping import group_neurons
torch.manual_seed(0)
layout = sys.argv[1] if len(sys.argv)>1 else "S0A32E64"
cfg = cmoe.CarveConfig.from_name(layout)
HO=2048
import os; FAST=os.environ.get("FAST")
def norms_of(h, down, routed): return torch.stack([(h[:,g]@down[:,g].T).norm(dim=-1) for g in routed],-1)
def fit(params, fn, X, T, steps, lr, batch=4096):
    params=[p.detach().clone().requires_grad_() for p in params]; opt=torch.optim.Adam(params,lr=lr)
    sched=torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    Tn=T/T.norm(dim=-1,keepdim=True)
    for s in range(steps):
        pick=torch.randint(len(X),(batch,))
        out=fn(X[pick],*params); out=out/out.norm(dim=-1,keepdim=True).clamp_min(1e-12)
        loss=(out-Tn[pick]).pow(2).sum(-1).mean(); opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    return [p.detach() for p in params]
for L in [2,10,18,26]:
    d=torch.load(f"/tmp/study/layer{L}.pt"); x,G,U,D=[d[n].detach() for n in ("x","gate","up","down")]
    h=F.silu(x@G.T)*(x@U.T); dn=D.norm(dim=0); y=h@D.T
    marks=activation_marks(h.abs()*dn, round(0.25*h.shape[1])); groups=group_neurons(marks, activation_rate(marks), cfg)
    routed, shared = groups.routed, groups.shared
    N=norms_of(h,D,routed); Xf,Xt=x[:-HO],x[-HO:]; Nf=N[:-HO]; k=cfg.active
    orc=N[-HO:].topk(k,-1).indices
    sm=torch.zeros(h.shape[1],dtype=torch.bool); sm[shared]=True
    def report(name, scores, extra=""):
        ch=scores.topk(k,-1).indices
        hits=torch.zeros(HO,cfg.routed,dtype=torch.bool).scatter_(1,orc,True)
        agr=float(hits.gather(1,ch).float().mean())
        keep=sm.expand(HO,-1).clone(); keep.scatter_(1,routed[ch].reshape(HO,-1),True)
        err=float(((h[-HO:]*keep)@D.T - y[-HO:]).norm()/y[-HO:].norm())
        print(f"L{L} {layout} {name:28s} agree {agr:.3f} relerr {err:.3f} {extra}",flush=True)
    report("oracle", N[-HO:])
    if cfg.shared==0:
        stat=torch.zeros(h.shape[1],dtype=torch.bool); stat[(h[:-HO].abs().mean(0)*dn).topk(round(cfg.active_fraction*h.shape[1])).indices]=True
        print(f"L{L} static-contrib relerr {float(((h[-HO:]*stat)@D.T - y[-HO:]).norm()/y[-HO:].norm()):.3f}")
    reps=groups.representatives
    report("representative", (F.silu(Xt@G[reps].T)*(Xt@U[reps].T)).abs())
    gated=lambda X,g,u:(F.silu(X@g.T)*(X@u.T)).abs()
    if FAST: continue_=1
    else:
     t=time.time(); g,u=fit([G[reps],U[reps]],gated,Xf,Nf,1000,3e-3); report("fitted gated 1000 3e-3",gated(Xt,g,u),f"{time.time()-t:.1f}s")
    # ridge linear on normalised norms
    Tn=Nf/Nf.norm(dim=-1,keepdim=True); Xa=torch.cat([Xf,torch.ones(len(Xf),1)],1)
    W=torch.linalg.solve(Xa.T@Xa+1e-3*torch.eye(Xa.shape[1]),Xa.T@Tn)
    report("ridge linear", torch.cat([Xt,torch.ones(HO,1)],1)@W)
    lin=lambda X,w,b: X@w.T+b
    if not FAST: t=time.time(); w,b=fit([W[:-1].T.contiguous(),W[-1].clone()],lin,Xf,Nf,1000,3e-3); report("fitted linear",lin(Xt,w,b),f"{time.time()-t:.1f}s")
    # low-rank activation-aware SVD
    C=(Xf.T@Xf)/len(Xf); ev,V=torch.linalg.eigh(C); S=V*ev.clamp_min(0).sqrt()  # C = S S^T
    for r in (32,64):
        def lowrank(M):
            A,s,Bt=torch.linalg.svd(M@S,full_matrices=False)  # M S = A s Bt; M ~ A_r A_r^T M
            Ar=A[:,:r]; return Ar, Ar.T@M
        Ag,Bg=lowrank(G); Au,Bu=lowrank(U)
        ht=(F.silu((Xt@Bg.T)@Ag.T)*((Xt@Bu.T)@Au.T)).abs()*dn
        sc=torch.stack([ht[:,gr].sum(-1) for gr in routed],-1)
        report(f"lowrank aSVD r{r} ({2*r*(576+1536)/(3*576*1536):.3f})",sc)
    for R in (() if FAST else (128,)):
        mlp=lambda X,A,a,B,b:(F.silu(X@A.T+a)@B.T+b)
        A0=torch.randn(R,576)/576**0.5; B0=torch.randn(cfg.routed,R)/R**0.5
        t=time.time(); p=fit([A0,torch.zeros(R),B0,torch.zeros(cfg.routed)],mlp,Xf,Nf,2000,3e-3); report(f"mlp{R} ({(R*576+R*cfg.routed)/(3*576*1536):.3f})",mlp(Xt,*p),f"{time.time()-t:.1f}s")
