// Element types shared by every CUDA room: the bf16 alias, the ElemType tag a launcher takes beside a
// void*, and the device's multiprocessor count (used to size grids to whole waves).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace antkv::cuda {

using bf16 = __nv_bfloat16;

// The element types a launcher accepts where it takes a void* (anything else is an antkv::Error).
enum class ElemType { kF32, kF16, kBF16 };
const char* elem_type_name(ElemType t);

// Multiprocessor count of the current device (cached).
int device_sm_count();

}  // namespace antkv::cuda
