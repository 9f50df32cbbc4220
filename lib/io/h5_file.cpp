#include "io/h5_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "core/atomic_file.h"
#include "core/error.h"

namespace antkv::h5 {
namespace {

// What failed first on one file: the OS reason and the operation.
struct Failure {
  int err = 0;
  std::string verb;  // "cannot write", "cannot read", "cannot open", "cannot create"
  std::string what;  // e.g. "writing 50357 bytes at offset 204800"
};

std::mutex g_mutex;
std::map<std::string, Failure> g_failures;  // by the file name given to create_file/open_file_read

void record(const std::string& name, int err, std::string verb, std::string what) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_failures.find(name);
  if (it == g_failures.end() || it->second.err == 0) g_failures[name] = Failure{err, std::move(verb), std::move(what)};
}

struct CheckedFile {
  H5FD_t pub;  // must come first: HDF5 sees only this
  int fd = -1;
  haddr_t eoa = 0, eof = 0;
  dev_t device = 0;
  ino_t inode = 0;
  bool failed = false;  // a write failed: drop every later write (the file is abandoned)
  std::string name;
};

CheckedFile* of(H5FD_t* f) { return reinterpret_cast<CheckedFile*>(f); }
const CheckedFile* of(const H5FD_t* f) { return reinterpret_cast<const CheckedFile*>(f); }

void fail_file(CheckedFile* f, int err, std::string what) {  // a write-side failure
  f->failed = true;
  record(f->name, err, "cannot write", std::move(what));
}

H5FD_t* drv_open(const char* name, unsigned flags, hid_t, haddr_t) {
  int o = (flags & H5F_ACC_RDWR) ? O_RDWR : O_RDONLY;
  if (flags & H5F_ACC_TRUNC) o |= O_TRUNC;
  if (flags & H5F_ACC_CREAT) o |= O_CREAT;
  if (flags & H5F_ACC_EXCL) o |= O_EXCL;
  const int fd = ::open(name, o | O_CLOEXEC, 0666);
  if (fd < 0) {
    // HDF5 first tries an existing file without O_CREAT: only a real create's failure is the user's
    if ((flags & H5F_ACC_CREAT) || !(flags & H5F_ACC_RDWR))
      record(name, errno, (flags & H5F_ACC_CREAT) ? "cannot create" : "cannot open", "opening");
    return nullptr;
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    record(name, errno, "cannot open", "fstat");
    ::close(fd);
    return nullptr;
  }
  auto* f = new CheckedFile();
  std::memset(&f->pub, 0, sizeof(f->pub));
  f->fd = fd;
  f->eof = static_cast<haddr_t>(st.st_size);
  f->device = st.st_dev;
  f->inode = st.st_ino;
  f->name = name;
  return &f->pub;
}

// Never fails towards HDF5 (a failed close leaves HDF5 1.10 with a dangling file that crashes at exit);
// the failure is recorded and raised by close_file().
herr_t drv_close(H5FD_t* file) {
  CheckedFile* f = of(file);
  if (!f->failed && (f->pub.access_flags & H5F_ACC_RDWR) && ::fsync(f->fd) != 0) fail_file(f, errno, "fsync");
  if (::close(f->fd) != 0 && !f->failed) fail_file(f, errno, "closing");
  delete f;
  return 0;
}

int drv_cmp(const H5FD_t* a, const H5FD_t* b) {
  const CheckedFile *x = of(a), *y = of(b);
  if (x->device != y->device) return x->device < y->device ? -1 : 1;
  if (x->inode != y->inode) return x->inode < y->inode ? -1 : 1;
  return 0;
}

herr_t drv_query(const H5FD_t*, unsigned long* flags) {
  if (flags)
    *flags = H5FD_FEAT_AGGREGATE_METADATA | H5FD_FEAT_ACCUMULATE_METADATA | H5FD_FEAT_DATA_SIEVE |
             H5FD_FEAT_AGGREGATE_SMALLDATA;
  return 0;
}

haddr_t drv_get_eoa(const H5FD_t* f, H5FD_mem_t) { return of(f)->eoa; }
herr_t drv_set_eoa(H5FD_t* f, H5FD_mem_t, haddr_t addr) {
  of(f)->eoa = addr;
  return 0;
}
haddr_t drv_get_eof(const H5FD_t* f, H5FD_mem_t) { return of(f)->eof; }
herr_t drv_get_handle(H5FD_t* f, hid_t, void** handle) {
  *handle = &of(f)->fd;
  return 0;
}

herr_t drv_read(H5FD_t* file, H5FD_mem_t, hid_t, haddr_t addr, size_t size, void* buf) {
  CheckedFile* f = of(file);
  auto* p = static_cast<unsigned char*>(buf);
  while (size > 0) {
    const ssize_t n = ::pread(f->fd, p, size, static_cast<off_t>(addr));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      record(f->name, errno, "cannot read", fmt::format("reading {} bytes at offset {}", size, addr));
      return -1;
    }
    if (n == 0) {  // past the end of the file: zeros, as sec2 does
      std::memset(p, 0, size);
      break;
    }
    p += n, addr += static_cast<haddr_t>(n), size -= static_cast<size_t>(n);
  }
  return 0;
}

herr_t drv_write(H5FD_t* file, H5FD_mem_t, hid_t, haddr_t addr, size_t size, const void* buf) {
  CheckedFile* f = of(file);
  if (f->failed) return 0;
  const haddr_t end = addr + size;
  const auto* p = static_cast<const unsigned char*>(buf);
  const size_t total = size;
  const haddr_t start = addr;
  while (size > 0) {
    const ssize_t n = ::pwrite(f->fd, p, size, static_cast<off_t>(addr));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      fail_file(f, n < 0 ? errno : EIO, fmt::format("writing {} bytes at offset {}", total, start));
      return 0;
    }
    p += n, addr += static_cast<haddr_t>(n), size -= static_cast<size_t>(n);
  }
  if (end > f->eof) f->eof = end;
  return 0;
}

herr_t drv_truncate(H5FD_t* file, hid_t, hbool_t) {
  CheckedFile* f = of(file);
  if (f->failed || f->eoa == f->eof) return 0;
  if (::ftruncate(f->fd, static_cast<off_t>(f->eoa)) != 0) {
    fail_file(f, errno, fmt::format("extending the file to {} bytes", f->eoa));
    return 0;
  }
  f->eof = f->eoa;
  return 0;
}

H5FD_class_t make_class() {
  H5FD_class_t c;
  std::memset(&c, 0, sizeof(c));
  c.name = "antkv_checked";
  c.maxaddr = (haddr_t{1} << 62) - 1;
  c.fc_degree = H5F_CLOSE_WEAK;
  c.open = drv_open;
  c.close = drv_close;
  c.cmp = drv_cmp;
  c.query = drv_query;
  c.get_eoa = drv_get_eoa;
  c.set_eoa = drv_set_eoa;
  c.get_eof = drv_get_eof;
  c.get_handle = drv_get_handle;
  c.read = drv_read;
  c.write = drv_write;
  c.truncate = drv_truncate;
  const H5FD_mem_t map[] = H5FD_FLMAP_DICHOTOMY;
  for (int i = 0; i < H5FD_MEM_NTYPES; ++i) c.fl_map[i] = map[i];
  return c;
}

hid_t driver_id() {
  static std::mutex m;
  static hid_t id = -1;
  static H5FD_class_t cls = make_class();
  std::lock_guard<std::mutex> lock(m);
  if (id < 0 || H5Iis_valid(id) <= 0) id = H5FDregister(&cls);
  ANTKV_CHECK(id >= 0, "HDF5: cannot register the antkv_checked file driver");
  return id;
}

H5::FileAccPropList checked_fapl(bool strong_close) {
  H5::FileAccPropList fapl;
  ANTKV_CHECK(H5Pset_driver(fapl.getId(), driver_id(), nullptr) >= 0, "HDF5: cannot select the antkv_checked driver");
  if (strong_close) {  // writing: the 1.10 file format, whose metadata (superblock, object headers, chunk
                       // indexes, attribute heaps) carries checksums, so damaged metadata is a read error too
    fapl.setFcloseDegree(H5F_CLOSE_STRONG);
    ANTKV_CHECK(H5Pset_libver_bounds(fapl.getId(), H5F_LIBVER_V110, H5F_LIBVER_V110) >= 0,
                "HDF5: cannot select the 1.10 file format");
  }
  return fapl;
}

std::string describe(const Failure& f) {
  return fmt::format("{}: {} ({})", f.verb, std::strerror(f.err), f.what);
}

// The HDF5 error-stack callback (replaces HDF5's printing): keeps a one-line summary of the first failure
// since the last reset, for the antkv::Error that guard() raises.
thread_local std::string t_stack_summary;
thread_local std::string t_object;  // ObjectContext

herr_t walk_cb(unsigned n, const H5E_error2_t* e, void* data) {
  auto* lines = static_cast<std::vector<std::string>*>(data);
  (void)n;
  if (e->desc && *e->desc) lines->push_back(fmt::format("{}: {}", e->func_name ? e->func_name : "?", e->desc));
  return 0;
}

herr_t on_error(hid_t estack, void*) {
  if (!t_stack_summary.empty()) return 0;
  std::vector<std::string> lines;  // outermost (the API call) first
  H5Ewalk2(estack, H5E_WALK_DOWNWARD, walk_cb, &lines);
  if (lines.empty()) return 0;
  t_stack_summary = lines.size() == 1 ? lines[0] : lines.front() + ": ... " + lines.back();
  if (!t_object.empty()) t_stack_summary = t_object + ": " + t_stack_summary;
  return 0;
}

}  // namespace

ObjectContext::ObjectContext(std::string what) : previous_(std::move(t_object)) { t_object = std::move(what); }
ObjectContext::~ObjectContext() { t_object = std::move(previous_); }

std::string error_stack_summary() { return t_stack_summary; }
void reset_error_stack_summary() { t_stack_summary.clear(); }
void install_error_handler() {
  H5Eset_auto2(H5E_DEFAULT, on_error, nullptr);
  // HDF5 closes itself at exit, in an atexit handler registered when it started (before this one, so it runs
  // after it). An error while it closes (a damaged file's metadata still cached) must not reach on_error: its
  // H5Ewalk2 would start the library's packages again, and HDF5 loops and prints "infinite loop closing library".
  static const bool once = std::atexit([] { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }) == 0;
  (void)once;
}

std::string recorded_failure(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_failures.find(path);
  return it == g_failures.end() || it->second.err == 0 ? std::string() : describe(it->second);
}

void forget_failure(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_failures.erase(path);
}

void check_write_error(const std::string& path) {
  const std::string why = recorded_failure(path);
  if (!why.empty()) fail("{}: {}", output_name(path), why);
}

namespace {
// Opens or creates `path` through the checked driver; a failure is one error line, the driver's recorded OS
// reason first. `shown` is the name the error gives (an output's final name for a temporary).
H5::H5File open_checked(const std::string& path, unsigned flags, bool writable, const std::string& shown,
                        const char* verb) {
  install_error_handler();
  forget_failure(path);
  reset_error_stack_summary();
  try {
    H5::FileCreatPropList fcpl;  // the root group without time stamps, like every object we create
    if (writable && H5Pset_obj_track_times(fcpl.getId(), false) < 0) fail("HDF5: cannot turn object time tracking off");
    return H5::H5File(path, flags, writable ? fcpl : H5::FileCreatPropList::DEFAULT, checked_fapl(writable));
  } catch (const H5::Exception& e) {
    const std::string why = recorded_failure(path);
    forget_failure(path);
    if (!why.empty()) fail("{}: {}", shown, why);
    if (writable) fail("{}: cannot {}: {}", shown, verb, error_stack_summary());
    // the file is there and readable, but HDF5 cannot make sense of its first bytes
    const std::string stack = error_stack_summary();
    reset_error_stack_summary();
    const bool hdf5 = H5Fis_hdf5(path.c_str()) > 0;
    fail("{}: superblock: damaged or not an antkv file ({})", shown,
         hdf5 ? "HDF5: " + stack : std::string("not an HDF5 file"));
  }
}
}  // namespace

H5::H5File create_file(const std::string& path) {
  return open_checked(path, H5F_ACC_TRUNC, true, output_name(path), "create");
}

H5::H5File open_file_read(const std::string& path) { return open_checked(path, H5F_ACC_RDONLY, false, path, "open"); }

void close_file(H5::H5File& file, const std::string& path) {
  reset_error_stack_summary();
  const hid_t id = file.getId();
  herr_t rc = 0;
  if (id >= 0 && H5Iis_valid(id) > 0) {
    rc = H5Fclose(id);  // strong close degree: closes the file's datasets and groups too
    // on success the id is invalid: the H5File destructor sees that and does not close it again
  }
  const std::string why = recorded_failure(path);
  forget_failure(path);
  if (!why.empty()) fail("{}: {}", output_name(path), why);
  if (rc < 0) fail("{}: closing failed: {}", output_name(path), error_stack_summary());
}

}  // namespace antkv::h5
