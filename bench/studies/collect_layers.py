import torch, sys
sys.path[:0]=['src','bench']
from cmoe.data import calibration_tokens
from cmoe.hf.adapters import adapter_for
from cmoe.hf.loading import load_model
torch.set_grad_enabled(False)
model, tok = load_model("smollm2"); ad = adapter_for(model); layers = ad.layers(model)
want=[2,10,18,26]; inputs={i:[] for i in want}
hooks=[ad.ffn_module(layers[i]).register_forward_pre_hook(lambda m,a,i=i: inputs[i].append(a[0].reshape(-1,a[0].shape[-1]))) for i in want]
for row in calibration_tokens(tok,"wikitext2",8,2048,seed=0): model(row[None],use_cache=False)
for i in want:
    f=ad.read(layers[i],model.config)
    torch.save(dict(x=torch.cat(inputs[i]),gate=f.gate,up=f.up,down=f.down),f"/tmp/study/layer{i}.pt")
