require ["vacation", "variables"];
# Pigeonhole-style out-of-office with a subject taken from the message
if header :matches "subject" "*" {
  set "subj" "${1}";
}
vacation :days 7 :subject "Away: ${subj}" :addresses ["ted@pop.contoso.test", "t.b@pop.contoso.test"]
  :handle "ooo-2026" text:
I am away until Monday.
..a line that starts with a dot
.
;
