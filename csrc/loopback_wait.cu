// The NCCL pipeline's stand-in wire (kvlink/transports/loopback_wire.py): a stream's wait for a
// flag in device memory, as a one-thread kernel that polls it.
//
// Why not cuStreamWaitValue32: a stream memory wait stops the hardware queue it sits in, and
// streams share those queues (CUDA_DEVICE_MAX_CONNECTIONS, 8 by default). Two endpoints in one
// process wait on each other's streams, so a wait that stops a queue can hold up the very write
// it waits for: the stand-in deadlocked there. A polling kernel occupies one thread of one SM and
// leaves the queues moving.
extern "C" __global__ void kvlink_loopback_wait(const volatile int* flag, unsigned long long value) {
  const int target = static_cast<int>(static_cast<unsigned int>(value));
  // cyclic >=, as CU_STREAM_WAIT_VALUE_GEQ: the flags only grow, and may wrap
  while (static_cast<int>(static_cast<unsigned int>(*flag) - static_cast<unsigned int>(target)) < 0) {
    __nanosleep(256);
  }
  __threadfence();  // what the writer made visible before the flag is visible to this stream's later work
}
