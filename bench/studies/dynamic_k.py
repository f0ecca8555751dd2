"""Dynamic k and per-layer allocation, with ridge routers fitted on dense inputs; PPL on 4 windows."""
import torch, sys, json, os, time
sys.path[:0]=['src','bench']
import torch.nn.functional as F
from torch import nn
import cmoe
from cmoe.core.activations import activation_marks, activation_rate, ffn_activations
from cmoe.core.grouping import group_neurons
from cmoe.core.router_fit import expert_output_norms
from cmoe.data import calibration_tokens, eval_text, tokenize
from cmoe.hf.adapters import adapter_for
from cmoe.hf.loading import load_model
from cmoe.tools.perplexity import perplexity
from oracles import with_rule
torch.set_grad_enabled(False)
budget=float(sys.argv[1]); variants=sys.argv[2].split(",")
model,tok=load_model("smollm2"); ad=adapter_for(model); layers=ad.layers(model)
ids=tokenize(tok, eval_text("wikitext2"))
cfg=cmoe.CarveConfig(budget=budget).for_ffn(1536,3)
cache=f"/tmp/study/groups_{cfg.name}.pt"
inputs=[[] for _ in layers]
hooks=[ad.ffn_module(l).register_forward_pre_hook(lambda m,a,i=i: inputs[i].append(a[0].reshape(-1,a[0].shape[-1]))) for i,l in enumerate(layers)]
for row in calibration_tokens(tok,"wikitext2",8,2048,seed=0): model(row[None],use_cache=False)
for h_ in hooks: h_.remove()
inputs=[torch.cat(c) for c in inputs]
if os.path.exists(cache): G=torch.load(cache)
else:
    G=[]
    for i,l in enumerate(layers):
        ffn=ad.read(l,model.config); h,s=ffn_activations(inputs[i],ffn,"contribution")
        marks=activation_marks(s,round(0.25*1536)); g=group_neurons(marks,activation_rate(marks),cfg)
        G.append((g.shared,g.routed))
    torch.save(G,cache)
k=cfg.active; E=cfg.routed
per=[]
for i,l in enumerate(layers):
    ffn=ad.read(l,model.config); x=inputs[i]; shared,routed=G[i]
    h=F.silu(x@ffn.gate.T)*(x@ffn.up.T); N=expert_output_norms(h,ffn.down,routed)
    T=N/N.norm(dim=-1,keepdim=True)
    Xa=torch.cat([x,torch.ones(len(x),1)],1); A=Xa.T@Xa; A+=1e-4*A.diagonal()[:-1].mean()*torch.eye(len(A))
    W=torch.linalg.solve(A.double(),(Xa.T@T).double()).float()
    pred=Xa@W
    # error curve for per-layer allocation: relerr of routed part as function of k (using router order)
    y=h@ffn.down.T
    order=pred.argsort(-1,descending=True)
    Y=torch.stack([h[:,g]@ffn.down[:,g].T for g in routed],1) if False else None
    per.append(dict(W=W,shared=shared,routed=routed,pred=pred))
    # dynamic-k threshold: per token choose experts with pred >= tau s.t. mean count = k
    flat=pred.flatten().sort(descending=True).values; per[-1]["tau"]=float(flat[k*len(x)-1])
    # curve: error energy of unchosen experts for each k (sampled)
    hs=h[::4]; ys=y[::4]; ords=order[::4]; sh=torch.zeros(1536,dtype=torch.bool); sh[shared]=True
    curve=[]
    for kk in range(0,E+1,1):
        keep=sh.expand(len(hs),-1).clone()
        if kk: keep.scatter_(1,routed[ords[:,:kk]].reshape(len(hs),-1),True)
        curve.append(float(((hs*keep)@ffn.down.T-ys).pow(2).sum()/ys.pow(2).sum()))
    per[-1]["curve"]=curve
    print("layer",i,"tau",per[-1]["tau"],"err@k",round(curve[k],4),flush=True)
# per-layer allocation: greedy on sum of relative squared errors, total = k*L
L=len(layers)
def allocate(weights):
    ks=[0]*L; 
    for _ in range(k*L):
        best=max(range(L),key=lambda l:(per[l]["curve"][ks[l]]-per[l]["curve"][ks[l]+1])*weights[l] if ks[l]<E else -1)
        ks[best]+=1
    return ks
class Mask(nn.Module):
    def __init__(s,ffn,p,mode,kk): super().__init__(); s.ffn,s.p,s.mode,s.kk=ffn,p,mode,kk; s.count=0; s.slots=0
    def forward(s,x,*a,**kw):
        shp=x.shape; x=x.reshape(-1,shp[-1]); f=s.ffn
        h=F.silu(x@f.gate.T)*(x@f.up.T)
        pred=torch.cat([x,torch.ones(len(x),1)],1)@s.p["W"]
        keep=torch.zeros(len(x),1536,dtype=torch.bool); keep[:,s.p["shared"]]=True
        if s.mode=="dynamic":
            sel=pred>=s.p["tau"]
        else:
            sel=torch.zeros_like(pred,dtype=torch.bool).scatter_(1,pred.topk(s.kk,-1).indices,True) if s.kk else torch.zeros_like(pred,dtype=torch.bool)
        s.count+=len(x); s.slots+=int(sel.sum())
        neur=sel[:,:,None].expand(-1,-1,s.p["routed"].shape[1]).reshape(len(x),-1)
        keep[:,s.p["routed"].reshape(-1)]|=neur
        return ((h*keep)@f.down.T).view(shp)
res=[]
for v in variants:
    if v=="fixed": ks=[k]*L; mode="fixed"
    elif v=="dynamic": ks=[k]*L; mode="dynamic"
    elif v=="alloc": ks=allocate([1.0]*L); mode="fixed"
    mods=[]
    def make(i,ffn):
        m=Mask(ffn,per[i],mode,ks[i]); mods.append(m); return m
    undo=with_rule(model,ad,make)
    ppl=perplexity(model,ids,2048,4,progress=False); undo()
    meank=sum(m.slots for m in mods)/sum(m.count for m in mods)
    r=dict(budget=budget,layout=cfg.name,variant=v,ppl=ppl,mean_k=meank,ks=ks)
    print(json.dumps(r),flush=True); open("/tmp/study/dyn.jsonl","a").write(json.dumps(r)+"\n")
