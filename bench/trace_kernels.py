"""GPU time of the plain (unsynchronised) training step in a bench/profile_7b.py trace, by the torch op that
launched each kernel (the innermost DEPTH ops; "?" = launched outside any op: cuBLAS/cuDNN through the driver).
    python bench/trace_kernels.py B DEPTH ROWS    (in the folder holding trace_B{B}.json.gz)
"""
import json,gzip,collections,bisect,sys
B=int(sys.argv[1])
ev=json.load(gzip.open(f'trace_B{B}.json.gz'))['traceEvents']
marks=sorted([e for e in ev if e.get('cat')=='user_annotation' and e['name'].startswith('mark:')],key=lambda e:e['ts'])
names=[m['name'] for m in marks]
a=marks[names.index('mark:plain_start')]['ts']; b=marks[names.index('mark:plain_end')]['ts']
ks=[e for e in ev if e.get('cat') in ('kernel','gpu_memcpy','gpu_memset') and 'dur' in e and a<=e['ts']<b]
rt={e['args'].get('correlation'):e for e in ev if e.get('cat')=='cuda_runtime' and 'args' in e}
ops=[e for e in ev if e.get('cat')=='cpu_op' and 'dur' in e]
bytid=collections.defaultdict(list)
for o in ops: bytid[o['tid']].append(o)
for t in bytid: bytid[t].sort(key=lambda o:o['ts'])
tsl={t:[o['ts'] for o in L] for t,L in bytid.items()}
def chain2(r):
    L=bytid.get(r['tid'],[]); T=tsl.get(r['tid'],[])
    i=bisect.bisect_right(T, r['ts']); out=[]
    for o in L[max(0,i-300):i]:
        if o['ts']<=r['ts']<=o['ts']+o['dur']: out.append(o['name'])
    return out
agg=collections.defaultdict(lambda:[0,0.0])
for k in ks:
    r=rt.get(k['args'].get('correlation'))
    if not r: agg[('?',)][0]+=1; agg[('?',)][1]+=k['dur']; continue
    c=chain2(r)
    key=tuple(x for x in c if not x.startswith('aten::empty'))[-int(sys.argv[2]):]
    agg[key][0]+=1; agg[key][1]+=k['dur']
for kk,(c,d) in sorted(agg.items(), key=lambda x:-x[1][1])[:int(sys.argv[3])]:
    print(f"{d/1e3:8.2f} ms {c:5d}  {' > '.join(kk)}")
