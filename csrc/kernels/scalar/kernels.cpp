// The scalar build of every kernel: the shared templates compiled with this
// folder's flags (see CMakeLists.txt) and this folder's GEMM micro-kernel.
#define CHAINRULE_ISA scalar
#include "../common.hpp"
#include "microkernel.hpp"
#include "../elementwise_impl.hpp"
#include "../gemm_impl.hpp"
#include "../instantiate.hpp"
