// Cooperative interruption: long loops call check_interrupted(), which throws antkv::Interrupted after
// SIGINT/SIGTERM, so destructors run and temporary outputs are removed instead of left half-written.
#pragma once

namespace antkv {

void install_interrupt_handler();
bool interrupted();
void check_interrupted();  // throws Interrupted

}  // namespace antkv
