require ["reject", "ereject", "body"];
/* refuse some content */
if body :text :contains ["casino", "lottery"] { reject "No thanks."; }
if body :raw :matches "*viagra*" { ereject text:
Your message looks like spam.
.
; }
