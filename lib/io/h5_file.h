// HDF5 files written with every error checked. HDF5 1.10 handles a failed write badly: H5Dclose/H5Fclose
// fail, the C++ destructors print "H5Fclose failed", and the library crashes at exit (H5F__close_cb on a
// half-destroyed file). Files made by create_file() go through a small POSIX driver ("antkv_checked") that
// records the first failed write / truncate / fsync / close (errno, offset, size) and from then on drops
// writes while telling HDF5 they succeeded, so HDF5 can always close cleanly; close_file() and guard() then
// raise the recorded failure as one antkv::Error line with the OS reason. The files are plain HDF5 (no
// driver information in the superblock): h5py and the sec2 driver read them.
#pragma once
#include <H5Cpp.h>

#include <string>

namespace antkv::h5 {

// Creates (truncates) path for writing through the checked driver; H5F_CLOSE_STRONG, so closing the file
// closes every object still open in it.
H5::H5File create_file(const std::string& path);
// Opens path read-only through the checked driver: an OS error names its reason; a file HDF5 cannot open is
// "<path>: superblock: damaged or not an antkv file (...)".
H5::H5File open_file_read(const std::string& path);
// Closes the file (and every object still open in it); throws antkv::Error naming the file and the OS
// reason when any write to it failed, or when closing failed.
void close_file(H5::H5File& file, const std::string& path);
// Throws antkv::Error when a read or write of the open file `path` has failed (cheap: after every step).
void check_write_error(const std::string& path);
// "cannot write: <OS reason> (<what was being done>)" (or cannot read / open / create) of the failure
// recorded for path, or "" when none.
std::string recorded_failure(const std::string& path);
// One line describing the HDF5 error stack of the call that just failed (innermost cause first), or ""
// when the stack is empty. Call before any other HDF5 call clears it.
std::string error_stack_summary();
void reset_error_stack_summary();
// Replaces HDF5's printing of its error stack by the summary above (idempotent; every entry point calls it).
void install_error_handler();
// Names the object being worked on in error_stack_summary() while alive (e.g. "dataset /layer_0/keys").
class ObjectContext {
 public:
  explicit ObjectContext(std::string what);
  ~ObjectContext();
  ObjectContext(const ObjectContext&) = delete;
  ObjectContext& operator=(const ObjectContext&) = delete;

 private:
  std::string previous_;
};

}  // namespace antkv::h5
