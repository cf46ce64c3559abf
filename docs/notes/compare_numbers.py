import json, sys
a=json.load(open(sys.argv[1])); b=json.load(open(sys.argv[2]))
def walk(x,y,path=""):
    diffs=[]
    if isinstance(x,dict) and isinstance(y,dict):
        for k in sorted(set(x)|set(y)):
            if k not in x or k not in y: diffs.append(f"{path}/{k}: only in {'after' if k not in x else 'before'}"); continue
            diffs+=walk(x[k],y[k],f"{path}/{k}")
    elif isinstance(x,list) and isinstance(y,list) and len(x)==len(y):
        for i,(u,v) in enumerate(zip(x,y)): diffs+=walk(u,v,f"{path}[{i}]")
    elif x!=y: diffs.append(f"{path}: {str(x)[:80]} -> {str(y)[:80]}")
    return diffs
d=walk(a,b)
# image hashes: compare as multisets per method folder kind, since GS/post-hoc param hashes appear in paths
ha=a["bench"]["image_hashes"]; hb=b["bench"]["image_hashes"]
print("bench image hashes equal as sets:", sorted(ha.values())==sorted(hb.values()), len(ha), len(hb))
print("\n".join(x for x in d if not x.startswith("/bench/image_hashes")) or "no other differences")
