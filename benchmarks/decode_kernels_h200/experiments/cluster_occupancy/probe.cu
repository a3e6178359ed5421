// How many thread-block clusters of 1, 2, 4, 8, 16 CTAs can be resident at once on this GPU when
// each CTA takes a whole SM the way the TileLang absorb kernel does (384 threads, ~220 KB of
// dynamic shared memory): cudaOccupancyMaxActiveClusters, plus a launch that records which SM
// each CTA of a full-machine grid of clusters ran on (%smid) and when it started (%globaltimer),
// to see whether all clusters were co-resident (one wave) or some waited.
// Build and run: nvcc -O2 -arch=sm_90a -o probe probe.cu && ./probe
#include <cstdio>
#include <cuda_runtime.h>

__global__ void spin(unsigned long long *start, unsigned *smid, int spin_ns) {
  extern __shared__ char smem[];
  unsigned long long t0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  if (threadIdx.x == 0) {
    smem[0] = 1;
    start[blockIdx.x] = t0;
    smid[blockIdx.x] = sm;
  }
  unsigned long long t = t0;
  while (t - t0 < (unsigned long long)spin_ns) asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
}

int main() {
  cudaDeviceProp p;
  cudaGetDeviceProperties(&p, 0);
  const int threads = 384, smem = 220 * 1024;
  cudaFuncSetAttribute(spin, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaFuncSetAttribute(spin, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  printf("%s: %d SMs; CTA = %d threads, %d KB dynamic shared memory (1 per SM)\n", p.name,
         p.multiProcessorCount, threads, smem / 1024);
  unsigned long long *start;
  unsigned *smid;
  cudaMalloc(&start, 4096 * sizeof(unsigned long long));
  cudaMalloc(&smid, 4096 * sizeof(unsigned));
  for (int c : {1, 2, 4, 8, 16}) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = c;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int n = 0;
    cfg.gridDim = dim3(c * 64);
    cudaError_t e = cudaOccupancyMaxActiveClusters(&n, spin, &cfg);
    if (e != cudaSuccess) {
      printf("cluster %2d: occupancy query failed: %s\n", c, cudaGetErrorString(e));
      cudaGetLastError();
      continue;
    }
    // a grid of 128 CTAs (the split cells' program count), each spinning 200 us: CTAs that
    // start >= 100 us after the first waited for a second wave
    int grid = 128 / c * c;
    cfg.gridDim = dim3(grid);
    e = cudaLaunchKernelEx(&cfg, spin, start, smid, 200000);
    cudaDeviceSynchronize();
    if (e != cudaSuccess) {
      printf("cluster %2d: max active clusters %3d (%3d CTAs); launch failed: %s\n", c, n, n * c,
             cudaGetErrorString(e));
      cudaGetLastError();
      continue;
    }
    unsigned long long h[4096];
    cudaMemcpy(h, start, grid * sizeof(unsigned long long), cudaMemcpyDeviceToHost);
    unsigned long long t0 = h[0];
    for (int i = 0; i < grid; i++) t0 = h[i] < t0 ? h[i] : t0;
    int late = 0;
    for (int i = 0; i < grid; i++) late += (h[i] - t0) >= 100000;
    printf("cluster %2d: max active clusters %3d (%3d CTAs); grid of %d CTAs: %d started in a "
           "second wave\n", c, n, n * c, grid, late);
  }
  return 0;
}
