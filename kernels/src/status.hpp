// Internal error plumbing: kernels throw duca::Error, the C boundary turns it into a status + message.
#pragma once

#include <cstddef>
#include <cstring>
#include <new>
#include <sstream>
#include <string>
#include <utility>

#include "duca_kernels.h"

namespace duca {

struct Error {
  duca_status status;
  std::string message;
};

template <class... Parts>
[[noreturn]] void fail(duca_status status, const Parts&... parts) {
  std::ostringstream text;
  (text << ... << parts);
  throw Error{status, text.str()};
}

inline void write_message(char* buffer, size_t capacity, const std::string& text) {
  if (buffer == nullptr || capacity == 0) return;
  const size_t length = text.size() < capacity - 1 ? text.size() : capacity - 1;
  std::memcpy(buffer, text.data(), length);
  buffer[length] = '\0';
}

// Runs `body` and maps every way it can fail onto a status; nothing escapes the C ABI.
template <class Body>
duca_status guarded(char* message, size_t message_size, Body&& body) {
  try {
    std::forward<Body>(body)();
    write_message(message, message_size, "");
    return DUCA_OK;
  } catch (const Error& error) {
    write_message(message, message_size, error.message);
    return error.status;
  } catch (const std::bad_alloc&) {
    write_message(message, message_size, "out of host memory");
    return DUCA_OUT_OF_MEMORY;
  } catch (const std::exception& error) {
    write_message(message, message_size, std::string("internal error: ") + error.what());
    return DUCA_INTERNAL_ERROR;
  }
}

}  // namespace duca
