#!/usr/bin/env python
"""Pilot: SJD2 on a small stand-in model, run before the bundled MNIST model existed.

    PYTHONPATH=. python benchmarks/pilot_sjd2_standin.py 8 0.2     # K, s_min

Fits the MNIST patch VQ (256 codes, 196 tokens), a 3-epoch quality classifier, trains a small
4-layer d=128 class-conditional GPT (5.5 min cap, no CFG) as the base, fine-tunes a copy for
SJD2 (K levels, s_min; 4 min cap, lr 3e-4, level-embedding lr 3e-3) with
``sjd_kernels.sjd2.train``, then decodes 60 images per seed (seeds 0, 1; temperature 1, no
top-k, no CFG) with AR, SJD and SJD2 through ``sjd2_loop`` and reports step compression,
class accuracy and FD (vs the 500 held-out images) as [mean, std over the 2 seeds]. The
log of the run quoted in docs/SJD2.md is ``benchmarks/results/sjd2_pilot_standin.log``.
A stand-in, not the bundled model: its numbers guide the defaults until
``benchmarks/bench_sjd2.py`` is run on the fine-tuned bundled model.
"""
import sys, time, math, json
import argparse
# the arguments first (exit 2 naming them), before the imports and the ten minutes of training
ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("K", type=int, nargs="?", default=8, help="SJD2 noise levels, >= 1 (default 8)")
ap.add_argument("s_min", type=float, nargs="?", default=0.2, help="smallest noise scale, in (0, 1] (default 0.2)")
args = ap.parse_args()
if args.K < 1:
    ap.error(f"argument K: must be an int >= 1 (the runs without noise levels are the SJD rows), got {args.K}")
if not 0 < args.s_min <= 1:
    ap.error(f"argument s_min: must be in (0, 1], got {args.s_min}")
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1]))
import torch, torch.nn as nn, torch.nn.functional as F, numpy as np
torch.set_num_threads(1)
from sjd_kernels import data
from sjd_kernels.models.tokenizer import PatchVQ
from sjd_kernels.quality import train_classifier
from sjd_kernels.sjd2.noise import NoiseSchedule, EmbedNorm, SJD2Embedding
from sjd_kernels.sjd2.train import noisy_image_inputs, next_clean_token_loss, param_groups, sample_levels_like
from sjd_kernels.sjd2.decode import sjd2_loop, SeqForward
t0=time.time()
def log(*a): print(f"[{time.time()-t0:6.0f}s]", *a, flush=True)
class GPT(nn.Module):
    def __init__(s, V=256, ncls=10, d=128, L=4, h=4, T=196):
        super().__init__(); s.V, s.ncls, s.h = V, ncls, h
        s.tok=nn.Embedding(V, d); s.cls=nn.Embedding(ncls+1, d); s.pos=nn.Parameter(0.02*torch.randn(T+64, d))
        s.blocks=nn.ModuleList([nn.ModuleList([nn.LayerNorm(d), nn.Linear(d,3*d), nn.Linear(d,d), nn.LayerNorm(d), nn.Linear(d,4*d), nn.Linear(4*d,d)]) for _ in range(L)])
        s.lnf=nn.LayerNorm(d); s.head=nn.Linear(d, V)
    def forward(s, x):
        B,L,d=x.shape; x=x+s.pos[:L]
        for ln1,qkv,o,ln2,up,down in s.blocks:
            q,k,v=qkv(ln1(x)).view(B,L,3,s.h,d//s.h).permute(2,0,3,1,4)
            a=F.scaled_dot_product_attention(q,k,v,is_causal=True).transpose(1,2).reshape(B,L,d)
            x=x+o(a); x=x+down(F.gelu(up(ln2(x))))
        return s.head(s.lnf(x))
    def seq(s, c, x, img_inputs=None):
        e = s.tok(x[:, :-1]) if img_inputs is None else img_inputs
        return s(torch.cat([s.cls(c).unsqueeze(1), e], 1))
Xtr,ytr=data.mnist('train'); Xte,yte=data.mnist('test')
vq=PatchVQ.fit(Xtr,256,patch=2,seed=0); log('vq fitted')
ttr,tte=vq.encode(Xtr),vq.encode(Xte); ytr_t,yte_t=torch.as_tensor(ytr),torch.as_tensor(yte)
clf=train_classifier(np.concatenate([Xtr, vq.decode(ttr).numpy()]), np.concatenate([ytr,ytr]), 10, epochs=3, log=lambda m: None); log('clf', clf.accuracy(Xte,yte))
torch.manual_seed(0); g=torch.Generator().manual_seed(0)
m=GPT()
def train(m, steps, lr, cap, sjd2=None, new_lr=None):
    groups = param_groups(m, sjd2, lr, new_lr) if sjd2 is not None else [{"params": list(m.parameters()), "lr": lr}]
    for gr in groups: gr["base"]=gr["lr"]
    opt=torch.optim.AdamW(groups, betas=(0.9,0.95), weight_decay=0.0); ts=time.time()
    for st in range(steps):
        idx=torch.randint(0,len(ttr),(32,),generator=g); x=ttr[idx]; c=ytr_t[idx].clone()
        c[torch.rand(32,generator=g)<0.1]=10
        sc=min(1,(st+1)/30)*(0.1+0.9*0.5*(1+math.cos(math.pi*st/steps)))
        for gr in opt.param_groups: gr["lr"]=gr["base"]*sc
        if sjd2 is None: lg=m.seq(c,x)
        else:
            lv=sample_levels_like(x, sjd2.levels, generator=g)
            lg=m.seq(c,x,noisy_image_inputs(sjd2, m.tok(x[:, :-1]), lv[:, :-1], g))
        loss=next_clean_token_loss(lg,x); opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(),1.0); opt.step()
        if st%100==0: log('step',st,float(loss))
        if time.time()-ts>cap: log('cap at', st); break
train(m, 1500, 2e-3, 330)
import copy
with torch.no_grad():
    ce=float(next_clean_token_loss(m.seq(yte_t[:200], tte[:200]), tte[:200])); log('base heldout ce', ce)
K, smin = args.K, args.s_min
ft=copy.deepcopy(m)
sjd2=SJD2Embedding(NoiseSchedule(levels=K, s_min=smin), EmbedNorm.from_embedding(ft.tok.weight))
train(ft, 1000, 3e-4, 240, sjd2, 3e-3)
with torch.no_grad():
    ce=float(next_clean_token_loss(ft.seq(yte_t[:200], tte[:200]), tte[:200])); log('ft heldout ce clean', ce)
def gen(model, emb, W, kv, seed, n=60, cfg=None):
    cls=torch.arange(n)%10; out=[]; steps=[]
    with torch.no_grad():
        for i in range(0,n,30):
            c=cls[i:i+30]; pe=model.cls(c).unsqueeze(1)
            if cfg: pe=torch.cat([pe, model.cls(torch.full_like(c,10)).unsqueeze(1)])
            fw=SeqForward(model, pe, len(c), 196+2*W+2, 0, 256)
            r=sjd2_loop(fw, model.tok.weight.detach(), emb, 196, [seed*1000+i+j for j in range(len(c))], window=W, kv=kv, cfg_scale=cfg)
            out.append(r.tokens); steps.append(r.steps)
    tok=torch.cat(out); st=torch.cat(steps).double()
    im=vq.decode(tok).numpy()
    return dict(comp=196/float(st.mean()), acc=clf.accuracy(im, cls.numpy()), fd=clf.fd(im, Xte))
res={}
for name, model, emb, W, kv in [("base AR", m, None, 0, "keep"), ("ft AR", ft, None, 0, "keep"), ("ft SJD16", ft, None, 16, "keep"),
                                 ("ft SJD2 W16 keep", ft, sjd2, 16, "keep"), ("ft SJD2 W16 recompute", ft, sjd2, 16, "recompute"),
                                 ("ft SJD2 W32 keep", ft, sjd2, 32, "keep"), ("ft SJD W32", ft, None, 32, "keep")]:
    rs=[gen(model, emb, W, kv, s) for s in (0,1)]
    agg={k:(np.mean([r[k] for r in rs]), np.std([r[k] for r in rs])) for k in rs[0]}
    log(name, json.dumps({k:[round(v[0],3), round(v[1],3)] for k,v in agg.items()}))
