#include "core/interrupt.h"

#include <csignal>

#include "core/error.h"

namespace antkv {
namespace {
volatile std::sig_atomic_t g_signal = 0;
extern "C" void on_signal(int sig) {
  if (g_signal) {  // second signal: stop now, the default way
    std::signal(sig, SIG_DFL);
    std::raise(sig);
  }
  g_signal = sig;
}
}  // namespace

void install_interrupt_handler() {
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) std::signal(sig, on_signal);
}
bool interrupted() { return g_signal != 0; }
int interrupt_signal() { return g_signal; }
void check_interrupted() {
  if (g_signal) throw Interrupted();
}

}  // namespace antkv
