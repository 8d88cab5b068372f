"""Exploratory search for the base model (standalone torch, central training, no split).

The first recipe search, kept because docs/pipeline.md "train" quotes its log
(``benchmarks/results/explore_arch.log``): the first 45,000 training images, scored on
the 10,000 test images, 2 threads. Each call runs one candidate given as Python:

    python benchmarks/explore_arch.py "run([32,64],[1,1],45000,8,drop=0.4,aug=False,hidden=256,ls=0.1)"

``benchmarks/model_recipe.py`` re-runs the main rows with the project's own model and
training code.
"""
import sys, time, math, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(2)
D='data/raw/FashionMNIST/raw/'
def idx(name):
    with open(D+name,'rb') as f: b=f.read()
    if 'images' in name: return torch.frombuffer(bytearray(b[16:]),dtype=torch.uint8).view(-1,1,28,28).float()/255
    return torch.frombuffer(bytearray(b[8:]),dtype=torch.uint8).long()
Xtr,Ytr=idx('train-images-idx3-ubyte'),idx('train-labels-idx1-ubyte')
Xte,Yte=idx('t10k-images-idx3-ubyte'),idx('t10k-labels-idx1-ubyte')

def net(widths, pools, bn=True, drop=0.0, hidden=0):
    layers=[]; c=1; s=28
    for i,(w,p) in enumerate(zip(widths,pools)):
        layers+= [nn.Conv2d(c,w,3,padding=1,bias=not bn)] + ([nn.BatchNorm2d(w)] if bn else []) + [nn.ReLU()]
        if p: layers.append(nn.MaxPool2d(2)); s//=2
        c=w
    if hidden: layers+=[nn.Flatten(), nn.Linear(c*s*s,hidden), nn.BatchNorm1d(hidden), nn.ReLU()] + ([nn.Dropout(drop)] if drop else []) + [nn.Linear(hidden,10)]
    else: layers+=[nn.Flatten()] + ([nn.Dropout(drop)] if drop else []) + [nn.Linear(c*s*s,10)]
    return nn.Sequential(*layers)

def augment(x,g,pad=2,flip=True):
    B=x.shape[0]
    xp=F.pad(x,(pad,)*4)
    oi=torch.randint(0,2*pad+1,(B,),generator=g); oj=torch.randint(0,2*pad+1,(B,),generator=g)
    ar=torch.arange(28)
    rows=(oi[:,None]+ar)[:,:,None]; cols=(oj[:,None]+ar)[:,None,:]
    out=xp[torch.arange(B)[:,None,None],0,rows,cols].unsqueeze(1)
    if flip:
        m=torch.rand(B,generator=g)<0.5
        out=torch.where(m[:,None,None,None],out.flip(-1),out)
    return out

def run(widths,pools,n,epochs,bs=128,lr=2e-3,drop=0.2,aug=True,bn=True,opt='adamw',sched='onecycle',wd=5e-4,seed=0,hidden=0,ls=0.0):
    g=torch.Generator().manual_seed(seed); torch.manual_seed(seed)
    m=net(widths,pools,bn,drop,hidden).to(memory_format=torch.channels_last)
    X,Y=Xtr[:n],Ytr[:n]
    steps=epochs*math.ceil(n/bs)
    if opt=='adamw': o=torch.optim.AdamW(m.parameters(),lr=lr,weight_decay=wd)
    else: o=torch.optim.SGD(m.parameters(),lr=lr,momentum=0.9,nesterov=True,weight_decay=wd)
    sch=torch.optim.lr_scheduler.OneCycleLR(o,max_lr=lr,total_steps=steps,pct_start=0.25) if sched=='onecycle' else None
    t=time.time()
    for e in range(epochs):
        m.train()
        for b in torch.randperm(n,generator=g).split(bs):
            x=X[b]; x=augment(x,g) if aug else x; x=x.contiguous(memory_format=torch.channels_last)
            loss=F.cross_entropy(m(x),Y[b],label_smoothing=ls); o.zero_grad(); loss.backward(); o.step()
            if sch: sch.step()
    tt=time.time()-t
    m.eval()
    with torch.no_grad(): acc=float(torch.cat([m(Xte[i:i+2000]).argmax(1) for i in range(0,10000,2000)]).eq(Yte).float().mean())
    nparam=sum(p.numel() for p in m.parameters())
    print(f"{widths} h={hidden} ls={ls} wd={wd} pools={pools} n={n} ep={epochs} bs={bs} lr={lr} drop={drop} aug={aug} bn={bn} opt={opt}: acc={acc:.4f} time={tt:.1f}s ({tt/epochs:.1f}s/ep) params={nparam}",flush=True)
    return acc,tt
if __name__=='__main__':
    exec(sys.argv[1])
