// Cooperative interruption: long loops call check_interrupted(), which throws antkv::Interrupted after
// SIGINT, SIGTERM or SIGHUP, so destructors run and temporary outputs are removed instead of left
// half-written. A second signal ends the process at once (the next run removes its temporaries).
#pragma once

namespace antkv {

void install_interrupt_handler();
bool interrupted();
int interrupt_signal();  // the signal received (0 when none)
void check_interrupted();  // throws Interrupted

}  // namespace antkv
